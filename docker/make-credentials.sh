#!/usr/bin/env bash
# Create what the compose deployment mounts, under docker/credentials/ (git-ignored):
#   certs/    a CA, and the SuperLink's TLS certificate for the names in SUPERLINK_NAMES
#   nodes/    one ECDSA (P-384) key pair per SuperNode, for SuperNode authentication
#   tuf/      release keys (root, targets offline; snapshot, timestamp online) via fedota
# Usage: docker/make-credentials.sh [NUM_SUPERNODES]   (needs openssl, ssh-keygen, fedota)
set -euo pipefail
cd "$(dirname "$0")"
n="${1:-2}"
out=credentials
names="${SUPERLINK_NAMES:-DNS:superlink,DNS:localhost,IP:127.0.0.1}"

# Every precondition is checked before anything is written: no half-made credentials.
case "$n" in
  '' | *[!0-9]* | 0*)
    echo "error: NUM_SUPERNODES is '$n'; expected a positive integer such as 2" >&2
    exit 2
    ;;
esac
missing=()
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ! -f "$out/tuf/root.json" ] && ! command -v fedota >/dev/null 2>&1; then
  missing+=("fedota (pip install fedota, or activate the virtualenv that has it)")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "error: make-credentials.sh needs on PATH: ${missing[*]}; nothing was written" >&2
  exit 2
fi

mkdir -p "$out/certs" "$out/nodes"

openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=fedota-ca" \
  -keyout "$out/certs/ca.key" -out "$out/certs/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=superlink" \
  -keyout "$out/certs/server.key" -out "$out/certs/server.csr" 2>/dev/null
printf 'subjectAltName=%s\n' "$names" > "$out/certs/san.ext"
openssl x509 -req -in "$out/certs/server.csr" -CA "$out/certs/ca.crt" -CAkey "$out/certs/ca.key" \
  -CAcreateserial -days 365 -extfile "$out/certs/san.ext" -out "$out/certs/server.pem" 2>/dev/null

for i in $(seq 1 "$n"); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$out/nodes/supernode-$i" <<<y >/dev/null
done

if [ ! -f "$out/tuf/root.json" ]; then
  fedota keys init --out "$out/tuf"
fi
echo "credentials written to docker/$out (keep tuf/private/root*.pem and targets*.pem offline)"
