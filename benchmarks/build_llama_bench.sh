#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench` from the same source and CMake flags as the
# llama-cpp-python that fedota's device runtime uses, so that bench_device_runtime.py
# can put fedota's backend side by side with llama.cpp's ceiling on the same GGUF.
#
#   bash benchmarks/build_llama_bench.sh [OUT_DIR]      # default: .cache/llama-bench
#
# Downloads the llama-cpp-python sdist of the installed version from PyPI (pip
# download), then builds only the llama-bench target (about 5 minutes on 2 cores).
# Prints the path of the binary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.cache/llama-bench}
py=${PYTHON:-$root/.venv/bin/python}
version=$("$py" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
if [ -x "$out/bin/llama-bench" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$version" ]; then
  echo "$out/bin/llama-bench"; exit 0
fi
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: --dest "$src" "llama-cpp-python==$version" >&2
tar -xzf "$src"/llama_cpp_python-"$version".tar.gz -C "$src"
llama="$src/llama_cpp_python-$version/vendor/llama.cpp"
# The device runtime's flags (.ci/llama-cmake-args), with the tools turned back on.
flags=$(grep -v '^#' "$root/.ci/llama-cmake-args" | tr '\n' ' ' | sed 's/-DLLAMA_BUILD_TOOLS=OFF/-DLLAMA_BUILD_TOOLS=ON/')
# shellcheck disable=SC2086
cmake -S "$llama" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF $flags >&2
cmake --build "$src/build" --target llama-bench -j "$(nproc)" >&2
mkdir -p "$out/bin"
cp "$src/build/bin/llama-bench" "$out/bin/llama-bench"
echo "$version" > "$out/version"
echo "$out/bin/llama-bench"
