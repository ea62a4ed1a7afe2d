"""What a device-only install saves: `pip install 'fedota[device]'` against the full install.

Side by side, for a fresh device-only virtualenv (built here exactly as the
``device_venv`` test fixture builds it, unless ``--device-venv`` names one) and the
project's full ``.venv``:

* installed size on disk of ``site-packages`` (allocated blocks, each hard-linked file
  once) and the number of installed distributions;
* import time and peak RSS of what ``fedota device update`` needs, each in a fresh
  process (median of ``--repeat``): on the device install ``client.update`` +
  ``client.runtime.llamacpp`` + ``llama_cpp`` (the llama.cpp runtime); on the full
  install the torch path ``client.runtime.runtime`` + torch + transformers +
  bitsandbytes + peft, and the device path again (the same code, with the full set
  installed beside it). Import time is measured inside the process from before the
  first import; ``process_s`` is the whole process from spawn to exit; peak RSS is the
  process's ``ru_maxrss``, interpreter included.

Also reported: how long the device install took (pip's caches as they are), the CPU
model and the 1-minute load average at start and end.

Usage::

    python benchmarks/bench_device_install.py                     # ~1 min, warm pip cache
    python benchmarks/bench_device_install.py --device-venv /tmp/dv --out runs/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.repo_helpers import make_device_venv  # noqa: E402  (as the tests build it)

DEVICE_PATH = ("client.update", "client.runtime.llamacpp", "llama_cpp")
FULL_PATH = ("client.runtime.runtime", "torch", "transformers", "bitsandbytes", "peft")

_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
import_s = time.perf_counter() - t0
print(json.dumps({"import_s": import_s,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def build_device_venv(root: Path) -> tuple[Path, float]:
    """A fresh ``fedota[device]`` venv under ``root``, as the test fixture builds it.

    Returns the venv and the seconds the whole build took.
    """
    start = time.perf_counter()
    venv = make_device_venv(root)
    return venv, time.perf_counter() - start


def site_packages(venv: Path) -> Path:
    """The venv's ``site-packages`` directory."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"error: {venv} has no lib/python3*/site-packages; is it a venv?")
    return found[0]


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (like ``du``: each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def distribution_count(python: Path) -> int:
    """How many distributions ``python`` sees installed (pip and setuptools included)."""
    code = (
        "import importlib.metadata as m;"
        "print(len({d.metadata['Name'].lower() for d in m.distributions()}))"
    )
    return int(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    )


def probe_imports(python: Path, modules: tuple[str, ...], repeat: int) -> dict[str, Any]:
    """Import ``modules`` in ``repeat`` fresh processes; medians and every run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = []
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: only what is installed
        for _ in range(repeat):
            start = time.perf_counter()
            done = subprocess.run(
                [str(python), "-c", _PROBE, *modules],
                capture_output=True,
                text=True,
                cwd=cwd,
                env=env,
                timeout=600,
            )
            if done.returncode != 0:
                raise SystemExit(
                    f"error: importing {modules} with {python} failed:\n{done.stderr[-2000:]}"
                )
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["process_s"] = time.perf_counter() - start
            runs.append(run)
    return {
        "modules": list(modules),
        "import_s": statistics.median(r["import_s"] for r in runs),
        "process_s": statistics.median(r["process_s"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_kib"] for r in runs) / 1024,
        "runs": runs,
    }


def describe_install(venv: Path, modules: tuple[str, ...], repeat: int) -> dict[str, Any]:
    """Size, distribution count and import cost of one install."""
    site = site_packages(venv)
    python = venv / "bin" / "python"
    return {
        "venv": str(venv),
        "site_packages_mib": disk_bytes(site) / 2**20,
        "distributions": distribution_count(python),
        "update_path": probe_imports(python, modules, repeat),
    }


def cpu_model() -> str:
    """``Model name`` from ``lscpu`` (the platform's processor string without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next(
        (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
        "unknown",
    )


def table(report: dict[str, Any]) -> str:
    """The side-by-side table printed after the JSON."""
    dev, full = report["device"], report["full"]
    dp, fp = dev["update_path"], full["update_path"]
    fdp = full["device_path_in_full_install"]
    seconds = report["device_install_s"]
    install = "given (--device-venv)" if seconds is None else f"{seconds} s (pip caches as found)"
    rows = [
        ("site-packages (MiB)", dev["site_packages_mib"], full["site_packages_mib"], "{:.0f}"),
        ("distributions", dev["distributions"], full["distributions"], "{:d}"),
        ("update path import (s)", dp["import_s"], fp["import_s"], "{:.2f}"),
        ("update path process (s)", dp["process_s"], fp["process_s"], "{:.2f}"),
        ("update path peak RSS (MiB)", dp["peak_rss_mib"], fp["peak_rss_mib"], "{:.0f}"),
    ]
    lines = [f"{'':28} {'device':>10} {'full':>10} {'full/device':>12}"]
    for name, a, b, fmt in rows:
        lines.append(f"{name:28} {fmt.format(a):>10} {fmt.format(b):>10} {b / a:>11.1f}x")
    lines.append(
        f"device path in the full install: import {fdp['import_s']:.2f} s, peak RSS "
        f"{fdp['peak_rss_mib']:.0f} MiB (median of {report['repeat']})"
    )
    lines.append(
        f"{report['cpu']}, {report['cpus']} CPUs; load {report['load_at_start']} -> "
        f"{report['load_at_end']}; device install: {install}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device-venv",
        type=Path,
        default=None,
        help="an existing fedota[device] venv (default: build a fresh one)",
    )
    parser.add_argument("--full-venv", type=Path, default=ROOT / ".venv")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_device_install.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "repeat": args.repeat,
    }
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        venv, install_s = args.device_venv, None
        if venv is None:
            venv, install_s = build_device_venv(Path(tmp))
        report["device_install_s"] = None if install_s is None else round(install_s, 1)
        report["device"] = describe_install(venv, DEVICE_PATH, args.repeat)
        report["full"] = describe_install(args.full_venv, FULL_PATH, args.repeat)
        report["full"]["device_path_in_full_install"] = probe_imports(
            args.full_venv / "bin" / "python", DEVICE_PATH, args.repeat
        )
    report["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
