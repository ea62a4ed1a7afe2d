"""Fleet scale: wall time and peak memory of the OTA half for 100, 1,000 and 10,000 devices.

Each size runs in a fresh Python process (so peak RSS is that run's own) through
``simulation.ota_rollout.run_fleet_demo``: the real ``fedota serve`` on 127.0.0.1
(SQLite), real TUF metadata and bundles, the real update agent on every device (enroll,
check, TUF refresh, download, verify, stage, health check, commit, telemetry), the micro
NF4 base.

* ``full`` mode: every device health-checks on the shared runtime of its tier and
  evaluates its held-out text after each update (per-device inference);
* ``lightweight`` mode: the update protocol without per-device inference — golden
  measurements are shared per (tier, base, adapter), no held-out evaluation.

Fault shares and the bad release are off here (the tests cover them); each size runs
``--releases`` releases with stages 10/50/100. Reported per size: wall seconds, seconds
per device-release, peak RSS of the simulation process and the largest peak RSS of its
child processes (the OTA server, including its start-up), bytes downloaded, devices on
the latest release.

``--train 100 1000 10000`` measures the training half instead: ``fedota simulate
--no-ota`` with that many clients, 50 per round, on Flower's simulation engine (Ray, two
client actors), sampling the RSS of the driver and of the whole process tree (Ray's
raylet, GCS and workers included) every 0.2 s. Clients are stateless between rounds
apart from their data partition and privacy ledger on disk, so memory should stay flat
as the population grows.

Usage::

    python benchmarks/bench_scale.py                          # 100 full, 1k and 10k light
    python benchmarks/bench_scale.py --sizes 100:full 1000:light
    python benchmarks/bench_scale.py --sizes 10000:light --releases 1 --quick
    python benchmarks/bench_scale.py --train 100 1000 10000   # federated clients
    python benchmarks/bench_scale.py --out runs/bench_scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ("100:full", "1000:light", "10000:light")


def _base(cache: Path) -> Path:
    from simulation import BasePreset, init_base_model
    from simulation.data import generate_public_texts

    out = cache / "base-micro-bench"
    if not (out / "nf4").is_dir():
        preset = BasePreset("micro", 512, 64, 2, 4, 2, 128, 32, 30, 8, 3e-3)
        init_base_model(out, public_texts=generate_public_texts(600, 0), preset=preset, seed=0)
    return out / "nf4"


def run_one(
    devices: int, mode: str, releases: int, cache: Path, *, quick: bool = False
) -> dict[str, Any]:
    """One size in this process; returns the measurements.

    ``quick``: one 100% stage, two sweeps per release and no catch-up sweep (fewer
    polls per device, so the largest fleet fits in a time box).
    """
    from simulation.fleet import FaultShares, FleetConfig, RolloutPolicy
    from simulation.ota_rollout import run_fleet_demo

    base = _base(cache)
    cfg = FleetConfig(
        devices=devices,
        faults=FaultShares(0.0, 0.0, 0.0, 0.0, bad_release_round=None),
        rollout=RolloutPolicy((100,) if quick else (10, 50, 100), max_failure_rate=0.5),
        lightweight=mode == "light",
        max_polls_per_round=2 if quick else 4,
        catch_up=not quick,
        golden_prompts=2,
        heldout_texts=2,
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        start = time.perf_counter()
        result = run_fleet_demo(Path(tmp), base_dir=base, fleet=cfg, rounds=releases)
        wall = time.perf_counter() - start
    fleet = result["fleet"]
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "devices": devices,
        "mode": mode,
        "releases": releases,
        "quick": quick,
        "wall_s": round(wall, 1),
        "s_per_device_release": round(wall / (devices * releases), 4),
        "peak_rss_bytes": self_kib * 1024,
        "server_peak_rss_bytes": child_kib * 1024,
        "inferences": fleet["inferences"],
        "bytes_downloaded": fleet["bytes_downloaded"],
        "bytes_if_full_model": fleet["bytes_if_full_model"],
        "healthy_on_latest": fleet["healthy_on_latest"],
        "mixed_state": fleet["mixed_state"],
        "budget_violations": fleet["budget_violations"],
        "apply_ms_p50": fleet["apply_ms_p50"],
    }


def run_training(
    clients: int, cache: Path, *, per_round: int = 50, rounds: int = 2
) -> dict[str, Any]:
    """``fedota simulate --no-ota`` with ``clients`` clients; wall time and peak RSS.

    Raises:
        RuntimeError: the simulation failed (its stderr tail is in the message).
    """
    import psutil

    base = _base(cache).parent
    with tempfile.TemporaryDirectory(prefix="bench-train-scale-") as tmp:
        cmd = [sys.executable, "-m", "fedota.cli", "simulate", "--no-ota", "--no-dp"]
        cmd += ["--clients", str(clients), "--clients-per-round", str(min(per_round, clients))]
        cmd += ["--rounds", str(rounds), "--local-steps", "2", "--eval-clients", "20"]
        cmd += ["--base-model", str(base), "--out", str(Path(tmp) / "run")]
        # The child's output goes to a file: an unread pipe would block it once full.
        log = (Path(tmp) / "simulate.log").open("wb")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        driver = psutil.Process(proc.pid)
        peak_driver = peak_tree = 0
        while proc.poll() is None:
            try:
                tree = [driver, *driver.children(recursive=True)]
                rss = [p.memory_info().rss for p in tree if p.is_running()]
            except psutil.Error:
                rss = []
            if rss:
                peak_driver = max(peak_driver, rss[0])
                peak_tree = max(peak_tree, sum(rss))
            time.sleep(0.2)
        wall = time.perf_counter() - start
        log.close()
        if proc.returncode != 0:
            tail = (Path(tmp) / "simulate.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{clients} clients failed:\n{tail}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    return {
        "clients": clients,
        "clients_per_round": min(per_round, clients),
        "rounds": rounds,
        "wall_s": round(wall, 1),
        "peak_rss_driver_bytes": peak_driver,
        "peak_rss_tree_bytes": peak_tree,
        "final_loss": summary["final"]["eval_loss"],
        "clients_trained": [r["clients_trained"] for r in summary["rounds"]],
    }


def _train_main(sizes: list[int], cache: Path) -> list[dict[str, Any]]:
    _base(cache)  # build once, outside the timed runs
    rows = []
    for n in sizes:
        row = run_training(n, cache)
        rows.append(row)
        print(
            f"{n:>6} clients ({row['clients_per_round']}/round, {row['rounds']} rounds) "
            f"{row['wall_s']:>7.1f} s  peak RSS driver "
            f"{row['peak_rss_driver_bytes'] / 2**20:7.1f} MiB, process tree "
            f"{row['peak_rss_tree_bytes'] / 2**20:7.1f} MiB  trained {row['clients_trained']}",
            flush=True,
        )
    return rows


def main() -> None:
    """Run every size in its own process and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--releases", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="1 stage, 2 sweeps, no catch-up")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--train", type=int, nargs="+", default=None, help="federated client counts instead"
    )
    args = parser.parse_args()
    if args.train:
        args.cache.mkdir(parents=True, exist_ok=True)
        rows = _train_main(args.train, args.cache)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"training": rows}, indent=2) + "\n")
        return
    if args.one:
        n, mode = args.one.split(":")
        print(json.dumps(run_one(int(n), mode, args.releases, args.cache, quick=args.quick)))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    _base(args.cache)  # build once, outside the timed runs
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--releases", str(args.releases)]
        cmd += ["--cache", str(args.cache)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{size}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['devices']:>6} devices {row['mode']:<5} {row['wall_s']:>8.1f} s  "
            f"{row['s_per_device_release'] * 1000:6.1f} ms/device-release  "
            f"peak {row['peak_rss_bytes'] / 2**20:7.1f} MiB (server "
            f"{row['server_peak_rss_bytes'] / 2**20:6.1f} MiB)  "
            f"on latest {row['healthy_on_latest']}/{row['devices']}  mixed {row['mixed_state']}",
            flush=True,
        )
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
