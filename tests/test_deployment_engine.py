"""Deployment engine: a real SuperLink and two SuperNodes on loopback, two rounds via
``flwr run`` of the same ``ServerApp`` / ``ClientApp`` the simulation uses.

The app is copied into a temporary directory (its ``pyproject.toml`` carries only the
``[tool.flwr.app]`` tables of ours): ``flwr run`` migrates a legacy
``[tool.flwr.federations]`` table by rewriting ``pyproject.toml``, which must never
happen to the repository's own file. ``FLWR_HOME`` points at a temporary Flower config
naming the loopback SuperLink. Every process listens on 127.0.0.1 only and is killed
at the end; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployment_helpers import BIN, REPO, Processes, free_port, write_app

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Processes(logs, env)
    yield p
    p.stop()


def test_two_rounds_on_a_real_superlink_with_two_supernodes(
    tmp_path: Path, procs: Processes, micro_base: Path
) -> None:
    from simulation.data import SyntheticConfig, generate_synthetic, write_partitions

    pyproject_before = (REPO / "pyproject.toml").read_bytes()

    parts = write_partitions(
        generate_synthetic(
            SyntheticConfig(num_clients=2, num_heldout_clients=0, seed=0, max_texts=30)
        ),
        tmp_path / "parts",
    )
    app_dir = tmp_path / "app"
    write_app(app_dir)
    link = free_port()
    home = Path(procs.env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs.start(
        "superlink",
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(link),
        "--disable-runtime-dependency-installation",
        "--database",
        str(tmp_path / "state.db"),
    )
    for i in range(2):
        node_config = f'data-file="{parts}/partition-{i}.json" state-dir="{tmp_path}/devices"'
        procs.start(
            f"supernode-{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        )
    ckpt = tmp_path / "checkpoints"
    overrides = (
        f"num-server-rounds=2 clients-per-round=2 min-clients=2 num-nodes=2 "
        f'dp-mode="none" aggregation="fedavg" local-steps=3 '
        f'base-model="{micro_base}" checkpoint-dir="{ckpt}" round-timeout-s=240.0'
    )
    deadline = time.monotonic() + 540  # each message starts a fresh flwr-clientapp process
    started = None
    while started is None or started.returncode != 0:
        started = subprocess.run(
            [str(BIN / "flwr"), "run", str(app_dir), "--run-config", overrides],
            env=procs.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        if started.returncode != 0:  # the SuperLink may still be starting
            assert time.monotonic() < deadline, started.stdout + started.stderr + procs.tail()
            time.sleep(2)
    assert "Successfully started run" in started.stdout, started.stdout + started.stderr

    latest = ckpt / "LATEST"
    while not (latest.is_file() and latest.read_text().strip() == "round-0002"):
        assert time.monotonic() < deadline, "two rounds did not finish in time\n" + procs.tail()
        time.sleep(2)
    state = json.loads((ckpt / "round-0002" / "state.json").read_text())
    history = state["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert h["train"]["clients-trained"] == 2
        assert h["train"]["round-applied"] == 1
        assert h["evaluate"]["clients-nodes"] == 2
    assert history[2]["evaluate"]["clients-loss"] < history[0]["evaluate"]["clients-loss"]
    # the repository's own pyproject.toml was not touched by `flwr run`
    assert (REPO / "pyproject.toml").read_bytes() == pyproject_before
