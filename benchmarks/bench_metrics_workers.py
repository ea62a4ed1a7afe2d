"""Do Prometheus counters add up across workers? Requests sent vs counted per scrape.

Two servers in turn, each with 2 worker processes on one SQLite database (or
PostgreSQL with ``--postgres``, a throwaway cluster from Debian's binaries):

* ``before``: uvicorn's workers without prometheus_client's multiprocess mode (what
  ``fedota serve --workers N`` ran until issue 24): each worker counts on its own;
* ``after``: ``fedota serve --workers 2``, which sets up a private
  ``PROMETHEUS_MULTIPROC_DIR`` and sums every worker's counters at scrape time.

For each, one device is enrolled, N update checks are sent over C keep-alive
connections (the kernel spreads connections over the workers), then ``/metrics`` is
scraped S times on fresh connections. Printed: requests sent, the value of
``fedota_update_checks_total{result="none"}`` in every scrape with the worker that
answered it, and checks/s while sending (both modes, same machine, same load).

Usage::

    python benchmarks/bench_metrics_workers.py                  # ~30 s
    python benchmarks/bench_metrics_workers.py --checks 2000 --scrapes 8 --postgres
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.server.ota.*: the tests' key and server helpers

from tests.server.ota.ota_helpers import (  # noqa: E402
    TufKeys,
    check,
    enroll,
    free_port,
    settings_env,
)
from tests.server.ota.serve_helpers import fedota_serve, stop, worker_of  # noqa: E402

WORKERS = 2


def uvicorn_workers(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """The app under plain ``uvicorn --workers 2`` (no multiprocess metrics)."""
    from server.ota import make_engine, upgrade, wait_until_ready

    engine = make_engine(env["FEDOTA_OTA_DATABASE_URL"])
    upgrade(engine)
    engine.dispose()
    clean = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "server.ota.app:app_from_env", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS),
         "--log-level", "warning"],
        env=clean, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    if not wait_until_ready(
        f"http://127.0.0.1:{port}", timeout_s=60, alive=lambda: proc.poll() is None
    ):
        stop(proc)
        raise SystemExit(f"uvicorn did not start:\n{log.read_text()[-2000:]}")
    return proc


def counted(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fedota_update_checks_total" and s.labels.get("result") == "none":
                return float(s.value)
    return 0.0


def drive(
    server: subprocess.Popen[bytes], port: int, checks: int, conns: int, scrapes: int
) -> dict:
    url = f"http://127.0.0.1:{port}"
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(conns)]
    try:
        device = enroll(clients[0])
        per_client = [checks // conns + (i < checks % conns) for i in range(conns)]
        start = time.perf_counter()
        with ThreadPoolExecutor(conns) as pool:
            list(
                pool.map(
                    lambda c, n: [check(c, device, None) for _ in range(n)], clients, per_client
                )
            )
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
    seen = []
    for _ in range(scrapes):
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.get("/metrics")
            seen.append((worker_of(server, port, response), counted(response.text)))
    return {"sent": checks, "scrapes": seen, "checks_per_s": checks / elapsed}


def database_url(stack: ExitStack, tmp: Path, postgres: bool) -> str:
    if not postgres:
        return f"sqlite:///{tmp / 'ota.db'}"
    from tests.server.ota.pg_cluster import running_cluster

    return stack.enter_context(running_cluster()).new_database()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    keys = TufKeys()
    print(f"# {platform.node()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as name, ExitStack() as stack:
        for mode in ("before", "after"):
            tmp = Path(name) / mode
            tmp.mkdir()
            env = settings_env(
                database_url(stack, tmp, args.postgres), tmp / "storage", keys.write(tmp / "keys")
            )
            port = free_port()
            if mode == "before":
                server = uvicorn_workers(env, port, tmp / "serve.log")
                try:
                    result = drive(server, port, args.checks, args.connections, args.scrapes)
                finally:
                    stop(server)
            else:
                with fedota_serve(env, port, tmp, workers=WORKERS) as server:
                    result = drive(server, port, args.checks, args.connections, args.scrapes)
            report(mode, result)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


def report(mode: str, result: dict) -> None:
    workers = sorted({pid for pid, _ in result["scrapes"]})
    values = [int(v) for _, v in result["scrapes"]]
    answered = [f"w{workers.index(pid) + 1}:{int(v)}" for pid, v in result["scrapes"]]
    exact = all(v == result["sent"] for v in values)
    print(
        f"{mode:6}  sent {result['sent']}  scraped {' '.join(answered)}  "
        f"{'EXACT' if exact else 'WRONG'}  ({result['checks_per_s']:.0f} checks/s, "
        f"{len(workers)} workers answered)"
    )


if __name__ == "__main__":
    main()
