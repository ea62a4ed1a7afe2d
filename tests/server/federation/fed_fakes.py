"""In-memory fakes for the federation tests: a loopback Grid and numpy "phones".

``LoopbackGrid`` implements Flower's ``Grid`` by calling a ``ClientApp`` in process, one
node at a time, turning exceptions into error replies (as the Flower runtimes do).
``fake_phone_app`` is a real ``flwr`` ``ClientApp`` that speaks fedota's record
contract but "trains" by moving the adapter towards a per-client target, so server
logic (sampling, validation, DP, checkpoints) is tested in milliseconds.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SHAPES = {
    "layers.0.q_proj.lora_A.weight": (2, 4),
    "layers.0.q_proj.lora_B.weight": (4, 2),
    "layers.1.v_proj.lora_A.weight": (2, 4),
    "layers.1.v_proj.lora_B.weight": (4, 2),
}


def initial_adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        k: (rng.uniform(-0.5, 0.5, s) if "lora_A" in k else np.zeros(s)).astype(np.float32)
        for k, s in SHAPES.items()
    }


@functools.cache
def target(client_index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + client_index)
    return {k: rng.normal(0.3, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}


@functools.cache
def population_target(n: int) -> dict[str, np.ndarray]:
    return {k: np.mean([target(i)[k] for i in range(n)], axis=0) for k in SHAPES}


class LoopbackGrid(Grid):
    """A Grid whose nodes are ``ClientApp`` calls in this process."""

    def __init__(self, apps: dict[int, tuple[ClientApp, dict[str, Any]]]) -> None:
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        self.apps = apps
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        self.calls: list[tuple[str, int]] = []

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            app, node_config = self.apps[node]
            context = Context(
                run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={}
            )
            self.calls.append((msg.metadata.message_type, node))
            mid = str(next(self._ids))
            msg.metadata.__dict__["_message_id"] = mid  # as Flower's InMemoryGrid ids them
            try:
                reply = app(copy.deepcopy(msg), context)
            except Exception as e:  # the runtime turns app failures into error replies
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


Behaviour = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | None]


def fake_phone_app(*, ffa: bool, misbehave: dict[str, Behaviour] | None = None) -> ClientApp:
    """A numpy phone: client ``c<i>`` moves halfway to ``target(i)`` each round.

    ``misbehave[client_id]`` post-processes that client's adapter (return ``None`` to
    raise, i.e. drop out).
    """
    app = ClientApp()
    misbehave = misbehave or {}

    def who(ctx: Context) -> tuple[str, str, int]:
        idx = int(ctx.node_config["index"])
        return str(ctx.node_config["client-id"]), str(ctx.node_config["role"]), idx

    def status(ctx: Context, st: str = "ok") -> ConfigRecord:
        cid, role, _ = who(ctx)
        return ConfigRecord({"client-id": cid, "role": role, "status": st, "message": ""})

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        content = RecordDict({"status": status(ctx)})
        if msg.content["config"].get("want") == "initial-adapter":
            content["arrays"] = ArrayRecord(
                array_dict={k: Array(v) for k, v in initial_adapter().items()}
            )
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        cid, role, idx = who(ctx)
        if role == "heldout":
            raise RuntimeError("held-out clients must never be asked to train")
        glob = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        tgt = target(idx)
        keys = [k for k in glob if not (ffa and "lora_A" in k)]
        new = {k: (glob[k] + 0.5 * (tgt[k] - glob[k])).astype(np.float32) for k in keys}
        if cid in misbehave:
            out = misbehave[cid](new)
            if out is None:
                raise ConnectionError(f"{cid} dropped out")
            new = out
        content = RecordDict(
            {
                "status": status(ctx),
                "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in sorted(new.items())}),
                "metrics": MetricRecord(
                    {
                        "num-examples": 10 + idx,
                        "train-loss": 1.0,
                        "steps": 1,
                        "epsilon": 0.5 * idx,
                        "noise-multiplier": 0.0,
                    }
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        glob = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        tgt = population_target(int(ctx.node_config["num-train"]))
        loss = float(sum(np.sum((glob[k] - tgt[k]) ** 2) for k in SHAPES if "lora_B" in k))
        metrics = MetricRecord(
            {"eval-loss": loss, "eval-accuracy": 1.0 / (1.0 + loss), "num-tokens": 10}
        )
        return Message(RecordDict({"status": status(ctx), "metrics": metrics}), reply_to=msg)

    return app


def make_grid(
    app: ClientApp,
    *,
    num_train: int,
    num_heldout: int = 1,
    node_offset: int = 1000,
    apps: dict[str, ClientApp] | None = None,
) -> LoopbackGrid:
    """Nodes for ``num_train`` training clients and ``num_heldout`` held-out clients.

    ``node_offset`` changes the node ids (as a restarted federation would).
    """
    nodes: dict[int, tuple[ClientApp, dict[str, Any]]] = {}
    for i in range(num_train + num_heldout):
        role = "train" if i < num_train else "heldout"
        cid = f"c{i}" if role == "train" else f"h{i}"
        node_config = {"client-id": cid, "role": role, "index": i, "num-train": num_train}
        nodes[node_offset + 7 * i] = ((apps or {}).get(cid, app), node_config)
    return LoopbackGrid(nodes)
