"""Fleet inventory pages at 100,000 devices on PostgreSQL, through the real app.

* A throwaway PostgreSQL cluster (``tests/server/ota/pg_cluster.py``, Debian's
  ``postgresql`` binaries) gets the migrated schema, then ``COPY`` bulk-loads N devices
  (default 100,000) on three bases, five installed versions and three runtimes, with
  last outcomes (installed 90 %, failed 3 %, retry 2 %, none 5 %) and last-seen times
  spread over ten days (so about 30 % are stale at the default seven days), two
  telemetry events each, and a rollout whose reports cover 30 % of them; then ANALYZE.
* The production app (``server.ota.app:app_from_env``, one uvicorn worker) serves it on
  127.0.0.1; one keep-alive client requests ``GET /v1/devices`` pages (50 rows) with each
  filter below, one after another, for R requests per filter — first pages, and pages
  deep into a walk (the cursor of page 20) — plus ``GET /v1/devices/{id}/history``.
* Reported per filter: p50 and p99 latency in ms and rows per page, the load average,
  and the CPU; then the database's own execution time of each first-page query
  (``EXPLAIN ANALYZE`` of the statement ``server.ota.inventory.page_query`` builds, R
  times) with the scans its plan uses — on a shared machine the HTTP figures carry the
  load, the database figures much less. ``--without-indexes`` drops the inventory's
  ``(column, id)`` indexes first, to show what they buy.

Usage::

    python benchmarks/bench_inventory.py                 # ~1 min
    python benchmarks/bench_inventory.py --devices 20000 --requests 50 --without-indexes
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.server.ota: the tests' cluster and key helpers

BASES = ["sha256:" + c * 64 for c in "abc"]
RUNTIMES = ["nf4", "llamacpp", "gguf"]
INDEXES = [
    "ix_devices_base_id",
    "ix_devices_installed_id",
    "ix_devices_runtime_id",
    "ix_devices_outcome_id",
    "ix_devices_last_seen",
]
FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "base (10 %)": {"base": BASES[2]},
    "version=3": {"version": 3},
    "runtime=gguf": {"runtime": "gguf"},
    "state=failed": {"state": "failed"},
    "state=retrying": {"state": "retrying"},
    "state=stale": {"state": "stale"},
    "state=ok": {"state": "ok"},
    "rollout=1": {"rollout": 1},
    "rollout=1 & failed": {"rollout": 1, "state": "failed"},
    "base & version & failed": {"base": BASES[0], "version": 2, "state": "failed"},
}


def _device_rows(count: int, now: dt.datetime) -> tuple[str, str, list[str]]:
    """COPY text for devices and telemetry events, and the ids of reporting devices."""
    rng = random.Random(0)
    devices, events, reporting = io.StringIO(), io.StringIO(), []
    for n in range(count):
        device_id = f"{rng.getrandbits(128):032x}"
        base = BASES[0] if n % 10 < 7 else BASES[1] if n % 10 < 9 else BASES[2]
        version = 1 + n % 5
        runtime = RUNTIMES[n % 3]
        roll = rng.random()
        outcome = "installed" if roll < 0.90 else "failed" if roll < 0.93 else "retry"
        outcome = "\\N" if roll >= 0.95 else outcome
        seen = now - dt.timedelta(seconds=rng.uniform(0, 10 * 86_400))
        caps = json.dumps({"supports_delta": True, "format_versions": [1], "runtime": runtime})
        last = "\\N" if outcome == "\\N" else seen.isoformat()
        detail = "health check failed" if outcome == "failed" else ""
        devices.write(
            f"{device_id}\tt{n}\t{seen.isoformat()}\t\\N\t{base}\t{version}\t{caps}\t"
            f"{2**29}\t2\t{runtime}\t{seen.isoformat()}\t{outcome}\t{version}\t{detail}\t{last}\n"
        )
        for seq in (1, 2):
            events.write(
                f"{device_id}\te{seq}\t{seq}\t{'installed' if seq == 1 else 'retry'}\t{version}\t"
                f"{version}\t\t{seen.isoformat()}\n"
            )
        if n % 10 < 3:
            reporting.append(device_id)
    return devices.getvalue(), events.getvalue(), reporting


def load(conninfo: str, count: int) -> tuple[list[str], float]:
    """Bulk-load the fleet; returns (device ids with history, seconds taken)."""
    import psycopg

    start = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    devices, events, reporting = _device_rows(count, now)
    columns = (
        "id, token_hash, created_at, revoked_at, base_fingerprint, installed_version, "
        "capabilities, memory_budget_bytes, last_event_seq, runtime, last_seen_at, "
        "last_outcome, last_outcome_version, last_outcome_detail, last_outcome_at"
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.cursor().copy(f"COPY devices ({columns}) FROM STDIN") as copy:
            copy.write(devices)
        with conn.cursor().copy(
            "COPY telemetry_events (device_id, event_id, seq, type, version, installed_version, "
            "detail, received_at) FROM STDIN"
        ) as copy:
            copy.write(events)
        conn.execute(
            "INSERT INTO rollouts (id, base_fingerprint, to_version, salt, stages, "
            "max_failure_rate, min_reports, min_reports_fraction, stage_index, state, "
            "created_at, updated_at) VALUES (1, %s, 6, 'salt', '[100]', 0.2, 10, 1.0, 0, "
            "'active', now(), now())",
            (BASES[0],),
        )
        with conn.cursor().copy(
            "COPY rollout_reports (rollout_id, device_id, stage_index, outcome, seq) FROM STDIN"
        ) as copy:
            copy.write("".join(f"1\t{d}\t0\tinstalled\t1\n" for d in reporting))
        conn.execute("ANALYZE")
    return reporting[:200], time.perf_counter() - start


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(1e3 * statistics.median(ordered), 2),
        "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def _timed(client: Any, path: str, params: dict[str, Any], requests: int) -> dict[str, Any]:
    samples, rows = [], 0
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(path, params=params)
        samples.append(time.perf_counter() - start)
        response.raise_for_status()
        body = response.json()
        rows = len(body.get("devices", body.get("events", [])))
    return {**_percentiles(samples), "rows": rows}


def _deep_cursor(client: Any, params: dict[str, Any], pages: int) -> str | None:
    cursor = None
    for _ in range(pages):
        page = client.get("/v1/devices", params={**params, **_c(cursor)}).json()
        cursor = page["next_cursor"]
        if cursor is None:
            return None
    return cursor


def _c(cursor: str | None) -> dict[str, str]:
    return {"cursor": cursor} if cursor else {}


def measure(base_url: str, key: str, history_ids: list[str], requests: int) -> dict[str, Any]:
    """p50/p99 of every filter's first page, its page 21, and device histories."""
    import httpx

    results: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for name, params in FILTERS.items():
            results[f"{name} | first page"] = _timed(client, "/v1/devices", params, requests)
            deep = _deep_cursor(client, params, 20)
            if deep is not None:
                deep_params = {**params, "cursor": deep}
                results[f"{name} | page 21"] = _timed(client, "/v1/devices", deep_params, requests)
        samples: list[float] = []
        for device_id in (history_ids * requests)[:requests]:
            start = time.perf_counter()
            client.get(f"/v1/devices/{device_id}/history").raise_for_status()
            samples.append(time.perf_counter() - start)
        results["device history"] = {**_percentiles(samples), "rows": 2}
    return results


def _filter_of(params: dict[str, Any]) -> Any:
    from server.ota import DeviceFilter, DeviceState

    state = params.get("state")
    return DeviceFilter(
        base_fingerprint=params.get("base"),
        installed_version=params.get("version"),
        runtime=params.get("runtime"),
        rollout_id=params.get("rollout"),
        state=DeviceState(state) if state else None,
    )


def _scans(plan: dict[str, Any]) -> list[str]:
    """The scan nodes of a plan, e.g. ``Index Scan/ix_devices_outcome_id``."""
    here = [f"{plan['Node Type']}/{plan.get('Index Name', plan.get('Relation Name', ''))}"]
    if "Scan" not in plan["Node Type"]:
        here = []
    return here + [scan for child in plan.get("Plans", []) for scan in _scans(child)]


def plans(url: str, repeats: int) -> dict[str, Any]:
    """The database's own execution time (``EXPLAIN ANALYZE``) of each filter's first-page
    query, as ``server.ota.inventory.page_query`` builds it, and the scans it uses."""
    from sqlalchemy import create_engine

    from server.ota import page_query

    engine = create_engine(url)
    stale_before = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for name, params in FILTERS.items():
            query = page_query(_filter_of(params), stale_before=stale_before, after=None, limit=50)
            compiled = query.compile(dialect=engine.dialect)
            sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string
            samples, plan = [], {}
            for _ in range(repeats):
                plan = conn.exec_driver_sql(sql, compiled.params).scalar()[0]  # type: ignore[index]
                samples.append(plan["Execution Time"] / 1e3)
            out[name] = {**_percentiles(samples), "scans": _scans(plan["Plan"])}
    engine.dispose()
    return out


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.ota import make_engine, upgrade
    from tests.server.ota.ota_helpers import (
        ROLE_KEYS,
        TufKeys,
        free_port,
        server_process,
        settings_env,
    )
    from tests.server.ota.pg_cluster import running_cluster

    with running_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        url = cluster.new_database()
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        conninfo = url.replace("postgresql+psycopg://", "postgresql://")
        history_ids, load_s = load(conninfo, args.devices)
        if args.without_indexes:
            import psycopg

            with psycopg.connect(conninfo, autocommit=True) as conn:
                for index in INDEXES:
                    conn.execute(f"DROP INDEX {index}")
        database = plans(url, args.requests)
        env = settings_env(url, Path(tmp) / "blobs", TufKeys().write(Path(tmp) / "keys"))
        port = free_port()
        with server_process(env, port):
            base_url = f"http://127.0.0.1:{port}"
            results = measure(base_url, ROLE_KEYS["operator"], history_ids, args.requests)
    return {
        "devices": args.devices,
        "requests_per_filter": args.requests,
        "indexes": not args.without_indexes,
        "load_s": round(load_s, 1),
        "machine": _machine(),
        "results": results,
        "database": database,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="Per filter.")
    parser.add_argument("--without-indexes", action="store_true")
    parser.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()
    report = run(args)
    print(f"{report['devices']} devices loaded in {report['load_s']} s; {report['machine']}")
    print(f"{'filter | page':45} {'p50 ms':>8} {'p99 ms':>8} {'rows':>5}")
    for name, figures in report["results"].items():
        print(f"{name:45} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f} {figures['rows']:5d}")
    print(f"\n{'filter (first page, EXPLAIN ANALYZE)':38} {'p50 ms':>7} {'p99 ms':>7}  scans")
    for name, figures in report["database"].items():
        scans = ", ".join(figures["scans"])
        print(f"{name:38} {figures['p50_ms']:7.3f} {figures['p99_ms']:7.3f}  {scans}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
