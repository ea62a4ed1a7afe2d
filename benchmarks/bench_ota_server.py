"""OTA server throughput: update checks for 10,000 devices, and ranged downloads.

One run, side by side, for SQLite and PostgreSQL (a throwaway cluster from Debian's
``postgresql`` binaries, skipped with a note if they are absent):

* the server (``uvicorn``, 2 workers by default, the production app from
  ``server.ota.app`` plus one trivial route ``GET /bench/trivial`` on the same app,
  middleware and settings) runs in its own processes on 127.0.0.1;
* 10,000 devices are enrolled (rows written directly, tokens hashed exactly as the
  server does) and a rollout offers each of them a delta;
* a load generator in a separate process (a minimal keep-alive HTTP/1.1 client on
  asyncio, so the client costs little CPU) polls ``POST /v1/devices/{id}/check`` round
  robin over the fleet with C connections for D seconds — half the fleet is on v1 and is
  offered a delta, half is up to date — alternating with the trivial endpoint polled
  the same way (its throughput is the ceiling on this machine), R times, so both see
  the same background load; then each group alone;
* 50 concurrent devices download an 8 MiB bundle in 1 MiB ``Range`` requests.

Reported: checks/s, p50/p99 latency (median run of R), ratio to the trivial endpoint
(median of the R per-repetition ratios, less sensitive to background load than either
figure alone), download MiB/s, and the 1-minute load average during every phase. The
last lines summarise both databases and whether issue #5's targets are met.
Everything is loopback-only, bounded in time, and stops by itself.

Usage::

    python benchmarks/bench_ota_server.py             # ~4 min
    python benchmarks/bench_ota_server.py --quick     # ~1 min
    python benchmarks/bench_ota_server.py --workers 1 --repeat 5 --out runs/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.server.ota.pg_cluster: the tests' helper

ROLE_KEY = "bench-role-key-0123456789"
FP = "sha256:" + "c" * 64


def bench_app() -> Any:
    """The production app plus one trivial route (uvicorn ``--factory`` target).

    Built as :func:`server.ota.app.app_from_env` builds each production worker's app.
    """
    from server.ota import create_app, freeze_startup_heap

    app = create_app()

    @app.get("/bench/trivial")
    def trivial() -> dict[str, bool]:
        return {"ok": True}

    freeze_startup_heap()
    return app


# ---------------------------------------------------------------------- fixtures


def _keys(directory: Path) -> tuple[dict[str, Path], Any]:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    signers = {
        r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
    }
    root = Root(expires=dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    md = Metadata(root)
    md.sign(signers["root"])
    directory.mkdir(parents=True)
    paths = {
        "root": directory / "root.json",
        "snapshot": directory / "snapshot.pem",
        "timestamp": directory / "timestamp.pem",
    }
    paths["root"].write_bytes(md.to_bytes())
    paths["snapshot"].write_bytes(signers["snapshot"].private_bytes)
    paths["timestamp"].write_bytes(signers["timestamp"].private_bytes)
    return paths, signers["targets"]


def _targets(signer: Any, bundles: dict[str, tuple[bytes, dict[str, Any]]]) -> bytes:
    from tuf.api.metadata import Metadata, TargetFile, Targets

    targets = Targets(version=1, expires=dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    for path, (data, meta) in bundles.items():
        targets.targets[path] = TargetFile(
            length=len(data),
            hashes={"sha256": hashlib.sha256(data).hexdigest()},
            path=path,
            unrecognized_fields={"custom": {"fedota": meta}},
        )
    md = Metadata(targets)
    md.sign(signer)
    return md.to_bytes()


def _meta(kind: str, frm: int | None, to: int, size: int) -> dict[str, Any]:
    return {
        "format_version": 1,
        "kind": kind,
        "from_version": frm,
        "to_version": to,
        "release_counter": to,
        "base_fingerprint": FP,
        "uncompressed_bytes": size,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(url: str, base: str, signer: Any, devices: int) -> tuple[list[tuple[str, str, int]], str]:
    """Publish a release over HTTP, roll it out, enroll devices; returns (ids, tokens), url."""
    import httpx
    from sqlalchemy import insert

    from server.ota import Database, DeviceRow, hash_token, make_engine

    full = os.urandom(8 * 2**20)
    delta = os.urandom(64 * 1024)
    bundles = {
        "adapters/2/full.fedota": (full, _meta("full", None, 2, len(full))),
        "adapters/2/delta-1.fedota": (delta, _meta("delta", 1, 2, len(delta))),
    }
    headers = {"Authorization": f"Bearer {ROLE_KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for data, _ in bundles.values():
            sha = hashlib.sha256(data).hexdigest()
            client.put(f"/v1/blobs/{sha}", content=data).raise_for_status()
        client.post(
            "/v1/releases",
            content=_targets(signer, bundles),
            headers={"Content-Type": "application/json"},
        ).raise_for_status()
        client.post(
            "/v1/rollouts", json={"base_fingerprint": FP, "to_version": 2, "stages": [100]}
        ).raise_for_status()
    # half the fleet is on v1 (the check offers the delta), half already on v2 (nothing new)
    fleet = [
        (os.urandom(16).hex(), "fdt_" + os.urandom(24).hex(), 1 if n % 2 == 0 else 2)
        for n in range(devices)
    ]
    now = dt.datetime.now(dt.UTC)
    caps = {"supports_delta": True, "format_versions": [1], "runtime": "bench"}
    db = Database(make_engine(url))
    with db.write() as session:
        session.execute(
            insert(DeviceRow),
            [
                {
                    "id": i,
                    "token_hash": hash_token(t),
                    "created_at": now,
                    "revoked_at": None,
                    "base_fingerprint": FP,
                    "installed_version": v,
                    "capabilities": caps,
                    "memory_budget_bytes": 2**29,
                    "last_event_seq": 0,
                }
                for i, t, v in fleet
            ],
        )
    db.dispose()
    with httpx.Client(base_url=base, timeout=60) as client:  # sanity: offers are real
        for device_id, token, installed in fleet[:2]:
            answer = client.post(
                f"/v1/devices/{device_id}/check",
                content=_check_body(installed),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ).json()["update"]
            assert (answer is not None) == (installed == 1), answer
    sha = hashlib.sha256(full).hexdigest()
    return fleet, f"/tuf/targets/adapters/2/{sha}.full.fedota"


# ---------------------------------------------------------------------- load generator


async def _http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, int]:
    writer.write(request)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("closed mid-body")
        remaining -= len(chunk)
    return status, length


def _check_body(installed: int) -> bytes:
    return json.dumps(
        {
            "base_fingerprint": FP,
            "installed_version": installed,
            "capabilities": {"supports_delta": True, "format_versions": [1], "runtime": "bench"},
            "memory_budget_bytes": 2**29,
        }
    ).encode()


def _check_request(device_id: str, token: str, installed: int) -> bytes:
    body = _check_body(installed)
    return (
        f"POST /v1/devices/{device_id}/check HTTP/1.1\r\nHost: b\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _poll(
    port: int, requests: list[bytes], connections: int, duration_s: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal errors, counter
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            request = requests[counter % len(requests)]
            counter += 1
            start = time.perf_counter()
            status, _ = await _http(reader, writer, request)
            latencies.append(time.perf_counter() - start)
            errors += status != 200
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1e3 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1e3 * latencies[int(len(latencies) * 0.99)], 2),
        "non_200": errors,
        "load_1m": round(os.getloadavg()[0], 1),
    }


async def _download(
    port: int, url: str, size: int, devices: int, duration_s: float
) -> dict[str, Any]:
    total = 0
    done = 0
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration_s
    chunk = 2**20

    async def device() -> None:
        nonlocal total, done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            for offset in range(0, size, chunk):
                request = (
                    f"GET {url} HTTP/1.1\r\nHost: b\r\n"
                    f"Range: bytes={offset}-{offset + chunk - 1}\r\n\r\n"
                ).encode()
                status, length = await _http(reader, writer, request)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 503:
                    await asyncio.sleep(0.05)
                total += length
                if time.perf_counter() > deadline:
                    break
            else:
                done += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(device() for _ in range(devices)))
    elapsed = time.perf_counter() - start
    return {
        "devices": devices,
        "mib_per_s": round(total / elapsed / 2**20, 1),
        "complete_downloads": done,
        "statuses": statuses,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["per_s"])[(len(runs) - 1) // 2]


def _loadgen(
    port: int,
    fleet: list[tuple[str, str, int]],
    download_url: str,
    args: dict[str, Any],
    queue: Any,
) -> None:
    """Runs in its own process: every measurement of one database.

    The mixed check and the trivial endpoint alternate ``repeat`` times, so both see the
    same background load; each is reported as its median run, and the ratio as the
    median of the per-repetition ratios.
    """
    offer = [_check_request(i, t, v) for i, t, v in fleet if v == 1]
    current = [_check_request(i, t, v) for i, t, v in fleet if v == 2]
    both = [r for pair in zip(offer, current, strict=False) for r in pair]
    trivial = [b"GET /bench/trivial HTTP/1.1\r\nHost: b\r\n\r\n"]
    connections, duration_s = args["connections"], args["duration_s"]
    warm = asyncio.run(_poll(port, both, connections, 1.0))
    warm_trivial = asyncio.run(_poll(port, trivial, connections, 1.0))
    result: dict[str, Any] = {"warmup_requests": warm["requests"] + warm_trivial["requests"]}
    mixed_runs, trivial_runs = [], []
    for _ in range(args["repeat"]):
        mixed_runs.append(asyncio.run(_poll(port, both, connections, duration_s)))
        trivial_runs.append(asyncio.run(_poll(port, trivial, connections, duration_s)))
    result["check_mixed"] = _median_run(mixed_runs)
    result["trivial"] = _median_run(trivial_runs)
    result["check_offer"] = asyncio.run(_poll(port, offer, connections, duration_s))
    result["check_up_to_date"] = asyncio.run(_poll(port, current, connections, duration_s))
    result["download"] = asyncio.run(_download(port, download_url, 8 * 2**20, 50, duration_s))
    ratios = sorted(m["per_s"] / t["per_s"] for m, t in zip(mixed_runs, trivial_runs, strict=True))
    result["check_mixed_to_trivial"] = round(ratios[(len(ratios) - 1) // 2], 3)
    for name in ("check_offer", "check_up_to_date"):
        result[f"{name}_to_trivial"] = round(result[name]["per_s"] / result["trivial"]["per_s"], 3)
    result["runs"] = {
        "check_mixed_per_s": [run["per_s"] for run in mixed_runs],
        "check_mixed_p99_ms": [run["p99_ms"] for run in mixed_runs],
        "trivial_per_s": [run["per_s"] for run in trivial_runs],
        "ratio": [round(r, 3) for r in ratios],
        "load_1m": [run["load_1m"] for run in mixed_runs + trivial_runs],
    }
    queue.put(result)


# ---------------------------------------------------------------------- orchestration


def run_one(kind: str, url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from server.ota import make_engine, upgrade

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    key_paths, targets_signer = _keys(work / f"keys-{kind}")
    env = {
        **os.environ,
        "FEDOTA_OTA_DATABASE_URL": url,
        "FEDOTA_OTA_STORAGE_DIR": str(work / f"blobs-{kind}"),
        "FEDOTA_OTA_TRUSTED_ROOT": str(key_paths["root"]),
        "FEDOTA_OTA_SNAPSHOT_KEY": str(key_paths["snapshot"]),
        "FEDOTA_OTA_TIMESTAMP_KEY": str(key_paths["timestamp"]),
        "FEDOTA_OTA_MAX_CONCURRENT_DOWNLOADS": "64",
        **{
            f"FEDOTA_OTA_{n}": ROLE_KEY
            for n in ("ADMIN_KEY", "OPERATOR_KEY", "PUBLISHER_KEY", "ENROLLMENT_SECRET")
        },
    }
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench_ota_server:bench_app",
            "--factory",
            "--app-dir",
            str(Path(__file__).parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        from server.ota import wait_until_ready

        base_url = f"http://127.0.0.1:{port}"
        if not wait_until_ready(base_url, timeout_s=60, alive=lambda: server.poll() is None):
            raise RuntimeError(f"{kind}: server did not start")
        fleet, download_url = _seed(url, f"http://127.0.0.1:{port}", targets_signer, args.devices)
        queue: Any = mp.get_context("spawn").Queue()
        loadgen = mp.get_context("spawn").Process(
            target=_loadgen,
            args=(
                port,
                fleet,
                download_url,
                {
                    "connections": args.connections,
                    "duration_s": args.duration_s,
                    "repeat": args.repeat,
                },
                queue,
            ),
        )
        loadgen.start()
        phases = 2 * args.repeat + 3
        result: dict[str, Any] = queue.get(timeout=args.duration_s * phases * 2 + 120)
        loadgen.join(timeout=10)
        return result
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _server_description(workers: int) -> str:
    """uvicorn's settings as the server runs with them (``auto`` picks these if present)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    plural = "s" if workers > 1 else ""
    return f"uvicorn, {workers} worker{plural}, {loop} + {http}, access log off"


def _targets_met(result: dict[str, Any]) -> dict[str, bool]:
    """Issue #5: >= 1,000 checks/s, p99 < 100 ms, >= 0.5 of the trivial endpoint."""
    mixed = result["check_mixed"]
    return {
        "checks_per_s_ge_1000": mixed["per_s"] >= 1000,
        "p99_lt_100_ms": mixed["p99_ms"] < 100,
        "ratio_ge_0.5": result["check_mixed_to_trivial"] >= 0.5,
    }


def _summary(report: dict[str, Any]) -> str:
    """One line per database: the figures docs/benchmarks.md quotes ("Update server")."""
    lines = []
    for kind in ("sqlite", "postgres"):
        result = report.get(kind)
        if not isinstance(result, dict):
            lines.append(f"{kind}: {result}")
            continue
        mixed, trivial = result["check_mixed"], result["trivial"]
        lines.append(
            f"{kind}: {mixed['per_s']:.0f} checks/s, p50 {mixed['p50_ms']:.1f} ms, "
            f"p99 {mixed['p99_ms']:.1f} ms; trivial {trivial['per_s']:.0f} req/s; "
            f"ratio {result['check_mixed_to_trivial']:.2f} "
            f"(runs {result['runs']['ratio']}); load {result['runs']['load_1m']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 s phases, one repetition (~1 min in all)"
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument(
        "--repeat", type=int, default=None, help="check/trivial repetitions (default 3; quick 1)"
    )
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.duration_s = args.duration_s or (2.0 if args.quick else 10.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "load_at_start": [round(x, 1) for x in os.getloadavg()],
        "devices": args.devices,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "repeat": args.repeat,
        "server": _server_description(args.workers),
    }
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as tmp:
        work = Path(tmp)
        report["sqlite"] = run_one("sqlite", f"sqlite:///{work / 'ota.db'}", work, args)
        from tests.server.ota.pg_cluster import find_pg_bin, running_cluster

        if find_pg_bin() is None:
            report["postgres"] = (
                "skipped: PostgreSQL binaries not found (apt-get install postgresql)"
            )
        else:
            with running_cluster() as cluster:
                report["postgres"] = run_one("postgres", cluster.new_database(), work, args)
                report["postgres"]["targets_met"] = _targets_met(report["postgres"])
    report["load_at_end"] = [round(x, 1) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    print(_summary(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
