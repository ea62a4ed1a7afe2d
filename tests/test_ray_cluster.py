"""``fedota simulate`` on an existing two-node Ray cluster (docs/deployment.md, "Simulation
past one machine").

Two Ray nodes are started the way an operator starts them on two machines (``ray start
--head`` and ``ray start --address``), here both on this host with one CPU each. The
simulation attaches with ``--ray-address`` instead of starting a private Ray instance;
the test checks the run finished and that Flower's ClientApp actors ran on *both* nodes.
Both nodes run with ``--block`` in sessions of their own and are killed, with every
Ray process they started, at the end; every wait is bounded.

Everything stays on loopback, but not on ``127.0.0.1``: Ray (2.55,
``ray._private.services.resolve_ip_for_localhost``) rewrites the literal hosts
``127.0.0.1``, ``localhost`` and ``::1`` - in ``ray start --node-ip-address`` and
``--address`` and in ``ray.init(address=..., _node_ip_address=...)`` alike - to the
address the host routes to the internet from (e.g. the interface address), and no
environment variable turns that off on Linux. Other loopback addresses (all of
``127.0.0.0/8`` reaches ``lo`` on Linux) are taken as given, so each node gets one of
its own, as two machines would: the head ``127.0.0.2``, the worker ``127.0.0.3``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deployment_helpers import BIN, Processes, fedota, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray clusters need Linux"),
]

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"

# Waits until the cluster has `want` live nodes, then prints {node id: node IP}; or,
# with "actors", prints where every ClientAppActor the cluster ever ran lived and who
# owned it, and the IP of every driver. Read from the GCS (ray._private.state): the
# public state API needs the dashboard, which these nodes do not start.
_PROBE = """
import json, sys, time, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
if sys.argv[2] == "nodes":
    deadline = time.monotonic() + float(sys.argv[4])
    while len(alive := {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()
                        if n["Alive"]}) < int(sys.argv[3]):
        if time.monotonic() > deadline:
            sys.exit(f"only {len(alive)} of {sys.argv[3]} Ray nodes alive")
        time.sleep(0.5)
    print(json.dumps(alive))
else:
    me = ray.get_runtime_context().get_job_id()
    print(json.dumps({
        "actors": [
            {"node": a["Address"]["NodeID"], "ip": a["Address"]["IPAddress"],
             "owner_ip": a["OwnerAddress"]["IPAddress"]}
            for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"
        ],
        "drivers": [j["DriverIPAddress"] for j in state.jobs() if j["JobID"] != me],
    }))
"""


@dataclass
class RayCluster:
    address: str
    nodes: dict[str, str]  # node id -> node IP
    env: dict[str, str]
    procs: Processes

    def probe(self, *args: str, timeout_s: float = 120) -> Any:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, self.address, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout_s,
        )
        assert done.returncode == 0, done.stderr[-3000:] + "\n" + self.procs.tail()
        return json.loads(done.stdout.strip().splitlines()[-1])


def _reachable(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            s.listen()
            socket.create_connection(s.getsockname(), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    for ip in (HEAD_IP, WORKER_IP):
        if not _reachable(ip):
            pytest.skip(f"loopback address {ip} not usable here")
    # Ray's socket paths must stay under the Unix limit: a short temp dir, not tmp_path.
    # The worker node takes the head's temp dir (from the GCS), so nothing of either
    # node lands in /tmp/ray, where other Ray instances on this host live.
    temp_dir = Path(tempfile.mkdtemp(prefix="fray-", dir="/tmp"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # Ray workers inherit the raylet's environment
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, env)
    port = free_port()
    address = f"{HEAD_IP}:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(80 * 2**20)]
    common += ["--disable-usage-stats", "--block"]
    try:
        procs.start(
            "ray-head", "ray", "start", "--head", "--node-ip-address", HEAD_IP,
            "--port", str(port), *common, "--include-dashboard", "false",
            "--temp-dir", str(temp_dir), "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
        )  # fmt: skip
        procs.start(
            "ray-worker", "ray", "start", "--address", address, "--node-ip-address",
            WORKER_IP, *common, "--dashboard-agent-listen-port", str(free_port()),
        )  # fmt: skip
        cluster = RayCluster(address, {}, env, procs)
        cluster.nodes = cluster.probe("nodes", "2", "150", timeout_s=240)
        yield cluster
    finally:
        procs.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_fedota_simulate_runs_on_an_existing_two_node_ray_cluster(
    tmp_path: Path, ray_cluster: RayCluster, micro_base: Path
) -> None:
    # both nodes advertise the loopback address they were given, not an interface's
    assert sorted(ray_cluster.nodes.values()) == [HEAD_IP, WORKER_IP], ray_cluster.nodes

    out = tmp_path / "run"
    result = fedota(
        "simulate", "--no-ota", "--ray-address", ray_cluster.address, "--clients", "2",
        "--clients-per-round", "2", "--rounds", "1", "--no-dp", "--local-steps", "2",
        "--base-model", str(micro_base), "--out", str(out),
        env=ray_cluster.env, timeout=480,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:] + "\n" + ray_cluster.procs.tail()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][-1]["round"] == 1, summary["rounds"]

    seen = ray_cluster.probe("actors")
    actors = seen["actors"]
    # the clients ran as actors of *this* cluster (not a private Ray instance) ...
    assert actors, "no ClientAppActor ran on the cluster"
    # ... one CPU per node, one client per CPU: both nodes took part ...
    assert {a["node"] for a in actors} == set(ray_cluster.nodes), (actors, ray_cluster.nodes)
    # ... every actor at its node's loopback address, owned by the simulation's driver,
    # which attached to the head node on this host
    assert all(a["ip"] == ray_cluster.nodes[a["node"]] for a in actors), actors
    assert {a["owner_ip"] for a in actors} == {HEAD_IP}, actors
    assert seen["drivers"] and set(seen["drivers"]) == {HEAD_IP}, seen
