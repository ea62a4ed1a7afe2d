"""The distributed deployment of docs/deployment.md, every part a real process on loopback.

PostgreSQL, ``fedota serve --workers 2`` on it, a SuperLink with TLS and SuperNode
authentication (credentials from ``docker/make-credentials.sh``), three registered
SuperNodes, two rounds with ``flwr run``; the global adapter goes through ``fedota
adapter export`` → ``package`` → ``publish`` → ``rollout create`` and a device updates to
it and runs it. Then a second run loses one SuperNode in the middle of its round and the
round still completes with the other two (``min-clients=2``).

The commands are the guide's, in the guide's order. Every process listens on 127.0.0.1,
every wait is bounded, every process group is killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployment_helpers import (
    BIN,
    REPO,
    Processes,
    fedota,
    free_port,
    golden_loss,
    http_ready,
    wait_for,
    write_app,
    write_flwr_config,
)
from tests.server.ota.pg_cluster import running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
NODES = 3
BUDGET_MB = 512
SECRETS = {
    "FEDOTA_OTA_ADMIN_KEY": "admin-key-0123456789abcdef",
    "FEDOTA_OTA_OPERATOR_KEY": "operator-key-0123456789abcdef",
    "FEDOTA_OTA_PUBLISHER_KEY": "publisher-key-0123456789abcdef",
    "FEDOTA_OTA_ENROLLMENT_SECRET": "enroll-secret-0123456789abcdef",
}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    env = {
        **os.environ,
        **SECRETS,
        "FEDOTA_PUBLISHER_KEY": SECRETS["FEDOTA_OTA_PUBLISHER_KEY"],
        "FEDOTA_OPERATOR_KEY": SECRETS["FEDOTA_OTA_OPERATOR_KEY"],
        "FEDOTA_ENROLLMENT_SECRET": SECRETS["FEDOTA_OTA_ENROLLMENT_SECRET"],
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


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def flwr_run(app: Path, overrides: str, procs: Processes, cwd: Path) -> None:
    """``flwr run`` against the TLS SuperLink; retried while the SuperLink starts."""
    deadline = time.monotonic() + 60
    while True:
        started = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "--run-config", overrides],
            env=procs.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
        )
        if started.returncode == 0:
            break
        assert time.monotonic() < deadline, started.stdout + started.stderr + procs.tail()
        time.sleep(1)
    assert "Successfully started run" in started.stdout, started.stdout + started.stderr


def run_config(base: Path, ckpt: Path, *, rounds: int, timeout_s: float) -> str:
    return (
        f"num-server-rounds={rounds} clients-per-round={NODES} min-clients=2 "
        f'num-nodes={NODES} dp-mode="none" aggregation="ffa" local-steps=2 '
        f'base-model="{base}" checkpoint-dir="{ckpt}" round-timeout-s={timeout_s}'
    )


def latest_round(ckpt: Path) -> int:
    latest = ckpt / "LATEST"
    return int(latest.read_text().strip().split("-")[1]) if latest.is_file() else -1


def test_deployment_guide_end_to_end_and_a_supernode_lost_mid_round(
    tmp_path: Path, procs: Processes, micro_base: Path
) -> None:
    env = procs.env
    # -- credentials: the deployment's own script, run on a copy so docker/ stays clean
    (tmp_path / "docker").mkdir()
    shutil.copy(REPO / "docker" / "make-credentials.sh", tmp_path / "docker")
    ok(
        subprocess.run(
            ["bash", str(tmp_path / "docker" / "make-credentials.sh"), str(NODES)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    )
    creds = tmp_path / "docker" / "credentials"
    certs, nodes, tuf = creds / "certs", creds / "nodes", creds / "tuf"

    # -- data: one partition per phone, golden prompts for the device's health check
    parts = tmp_path / "partitions"
    ok(
        fedota(
            "data", "partition", "--clients", str(NODES), "--max-texts", "12",
            "--golden", "4", "--out", str(parts), env=env,
        )
    )  # fmt: skip

    with running_cluster() as pg:
        # -- the OTA server: 2 workers on PostgreSQL, blobs in a shared directory
        ota_port = free_port()
        ota = f"http://127.0.0.1:{ota_port}"
        procs.start(
            "ota-server", "fedota", "serve", "--database-url", pg.new_database(),
            "--storage", str(tmp_path / "blobs"), "--trusted-root", str(tuf / "root.json"),
            "--snapshot-key", str(tuf / "private" / "snapshot.pem"),
            "--timestamp-key", str(tuf / "private" / "timestamp.pem"),
            "--host", "127.0.0.1", "--port", str(ota_port), "--workers", "2", "--migrate",
        )  # fmt: skip

        # -- the SuperLink: TLS on its one HTTP port, SuperNode authentication on
        link = free_port()
        procs.start(
            "superlink", "flower-superlink",
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link),
            "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "superlink.db"),
        )  # fmt: skip
        write_flwr_config(
            Path(env["FLWR_HOME"]),
            name="local-tls",
            address=f"127.0.0.1:{link}",
            root_cert=certs / "ca.crt",
        )

        # -- register the three SuperNodes' public keys, then start them
        def register(i: int) -> bool:
            done = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(nodes / f"supernode-{i}.pub")],
                env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )  # fmt: skip
            return done.returncode == 0 and "registered successfully" in done.stdout

        for i in range(1, NODES + 1):
            wait_for(lambda i=i: register(i), timeout_s=60, what="register", logs=procs.tail)  # type: ignore[misc]
        supernodes = []
        for i in range(1, NODES + 1):
            node_config = (
                f'data-file="{parts}/partition-{i - 1}.json" state-dir="{tmp_path}/phone-{i}"'
            )
            node = procs.start(
                f"supernode-{i}", "flower-supernode", "--superlink", f"127.0.0.1:{link}",
                "--root-certificates", str(certs / "ca.crt"),
                "--auth-supernode-private-key", str(nodes / f"supernode-{i}"),
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", node_config,
            )  # fmt: skip
            supernodes.append(node)
        # an unregistered key is refused by the SuperLink
        stranger = tmp_path / "stranger"
        ok(
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(stranger)],
                capture_output=True, text=True, timeout=30,
            )
        )  # fmt: skip
        intruder = procs.start(
            "supernode-unregistered", "flower-supernode", "--superlink", f"127.0.0.1:{link}",
            "--root-certificates", str(certs / "ca.crt"),
            "--auth-supernode-private-key", str(stranger),
            "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "1",
            "--node-config", f'data-file="{parts}/partition-0.json" state-dir="{tmp_path}/x"',
        )  # fmt: skip

        # -- two rounds
        app = tmp_path / "app"
        write_app(app)
        ckpt = tmp_path / "checkpoints"
        flwr_run(app, run_config(micro_base, ckpt, rounds=2, timeout_s=240.0), procs, tmp_path)
        wait_for(lambda: latest_round(ckpt) == 2, timeout_s=300, what="two rounds", logs=procs.tail)
        history = json.loads((ckpt / "round-0002" / "state.json").read_text())["history"]
        assert [h["round"] for h in history] == [0, 1, 2]
        assert all(h["train"]["clients-trained"] == NODES for h in history[1:]), history
        assert history[2]["evaluate"]["clients-loss"] < history[0]["evaluate"]["clients-loss"]
        wait_for(
            lambda: intruder.poll() is not None,
            timeout_s=60,
            what="the unregistered SuperNode giving up",
            logs=procs.tail,
        )
        refused = (procs.logs / "supernode-unregistered.log").read_text(errors="replace")
        assert intruder.returncode != 0 and "Failed to activate SuperNode" in refused

        # -- export → package → publish → rollout
        wait_for(lambda: http_ready(f"{ota}/readyz"), timeout_s=60, what="OTA", logs=procs.tail)
        peft = tmp_path / "release" / "adapter-v1"
        ok(
            fedota(
                "adapter", "export", "--run", str(ckpt), "--base-model", str(micro_base),
                "--out", str(peft), "--rank", "8", "--alpha", "16", "--seed", "0", "--ffa",
                env=env,
            )
        )  # fmt: skip
        golden = json.loads((parts / "golden.json").read_text())
        nf4 = micro_base / "nf4"  # what phones hold: the pre-quantized copy
        loss = golden_loss(nf4, peft, golden, budget_mb=BUDGET_MB)
        provenance = tmp_path / "release" / "provenance-v1.json"
        provenance.write_text(
            json.dumps(
                {
                    "round": 2,
                    "num_clients": NODES,
                    "aggregation": "ffa",
                    "eval_metrics": {"loss": loss},
                }
            )
        )
        bundle = tmp_path / "release" / "adapter-v1.fedota"
        ok(
            fedota(
                "package", "--new", str(peft), "--ffa", "--base", str(nf4),
                "--state-out", str(tmp_path / "release" / "packager-state"),
                "--provenance", str(provenance), "--keys", str(tuf), "--out", str(bundle),
                env=env,
            )
        )  # fmt: skip
        ok(fedota("publish", str(bundle), "--keys", str(tuf), "--server", ota, env=env))
        fingerprint = ok(fedota("base-model", "fingerprint", str(nf4), env=env)).split()[-1]
        ok(
            fedota(
                "rollout", "create", "--version", "1", "--base", fingerprint,
                "--stages", "100", "--server", ota, env=env,
            )
        )  # fmt: skip

        # -- a device: enroll, update, run the federated adapter
        device = tmp_path / "device"
        ok(
            fedota(
                "device", "enroll", "--server", ota, "--state", str(device),
                "--root", str(tuf / "1.root.json"), "--base", str(nf4),
                "--budget-mb", str(BUDGET_MB), "--golden", str(parts / "golden.json"), env=env,
            )
        )  # fmt: skip
        ok(fedota("device", "update", "--state", str(device), env=env))
        status = json.loads(
            ok(fedota("device", "status", "--state", str(device), "--json", env=env))
        )
        assert status["active_version"] == 1 and status["base_fingerprint"] == fingerprint
        answer = json.loads(
            ok(
                fedota(
                    "device", "infer", "--state", str(device), "--prompt", golden[0][:40],
                    "--max-new-tokens", "8", "--json", env=env,
                )
            ).splitlines()[0]
        )  # fmt: skip
        assert answer.get("adapter_version") == 1, answer

        # -- a SuperNode lost mid-round: the round completes with the other two
        ckpt2 = tmp_path / "checkpoints-lost-node"
        victim_log = procs.logs / f"supernode-{NODES}.log"

        def trains_received() -> int:
            return victim_log.read_text(errors="replace").count("Receiving: train message")

        before = trains_received()
        flwr_run(app, run_config(micro_base, ckpt2, rounds=1, timeout_s=60.0), procs, tmp_path)
        wait_for(
            lambda: trains_received() > before,
            timeout_s=240,
            what="the third SuperNode receiving its round-1 training message",
            logs=procs.tail,
        )
        assert latest_round(ckpt2) == 0  # round 1 is under way
        Processes.kill(supernodes[-1])
        wait_for(lambda: latest_round(ckpt2) == 1, timeout_s=240, what="round 1", logs=procs.tail)
        last = json.loads((ckpt2 / "round-0001" / "state.json").read_text())["history"][-1]
        assert last["train"]["clients-trained"] == NODES - 1, last
        # the lost node's reply is an error (or never comes), not a silent success
        assert last["train"]["clients-failed"] + last["train"]["clients-dropped"] == 1, last
        assert last["train"]["round-applied"] == 1, last
