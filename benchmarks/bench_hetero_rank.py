"""LoRA ranks sized to each phone's memory (issue 25 item 6, ADR 0016).

For each seed, three federated runs on the same synthetic data, base model and seed:

* ``all-low``   every phone trains the lowest rank (``lora-rank = 4``; today's path)
* ``mixed``     ``lora-ranks = 4,8,16``: phone ``i`` gets memory tier ``i mod 3``, the
                tiers being the estimated training peaks of ranks 4, 8 and 16 rounded
                up to a MiB (``client-memory-tiers-mib``; under ``ffa``, where the ranks
                differ by less than a MiB, the exact bytes as each phone's
                ``memory-budget-bytes``), so two training phones train each rank
                (asserted from the round metrics); the server aggregates rank-aware
                (zero-padding, each rank slice averaged over the phones that hold it)
* ``all-high``  every phone trains the highest rank (``lora-rank = 16``)

LoRA alpha is twice the global rank in every row, so the LoRA scale (2) is the same.
Reported: next-token accuracy and loss after the last round on the training phones'
held-out text (each phone evaluates the global adapter truncated to its own rank) and
on held-out phones (which get tiers too: ranks 4 and 8 in ``mixed``), and the upload
per round. The base is the cached ``tiny`` preset (``fedota base-model init``'s), and
training is ``fedota simulate --no-dp``'s defaults (``fedavg``, 10 local steps);
``--aggregation ffa`` freezes A (FFA-LoRA) and exchanges B only.

The federation runs the real ``ServerApp`` orchestrator and the real ``ClientApp``
over an in-process grid (one phone at a time, no Ray), which is what makes three runs
per seed affordable on a shared 2-core machine.

Usage::

    .venv/bin/python benchmarks/bench_hetero_rank.py --seeds 0 1 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RANKS = (4, 8, 16)


def _grid(apps: dict[int, tuple[Any, dict[str, Any]]]) -> Any:
    """Flower's ``Grid`` over ``ClientApp`` calls in this process."""
    import copy

    from flwr.app import Context, Error, Message, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    class InProcessGrid(Grid):  # type: ignore[misc]
        def __init__(self) -> None:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
            self._replies: dict[str, Message] = {}
            self._ids = itertools.count(1)

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int,
                           group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
            return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                           group_id=group_id)  # fmt: skip

        def get_node_ids(self) -> Iterable[int]:
            return list(apps)

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            ids = []
            for msg in messages:
                node = msg.metadata.dst_node_id
                app, node_config = apps[node]
                ctx = Context(run_id=1, node_id=node, node_config=node_config,
                              state=RecordDict(), run_config={})  # fmt: skip
                mid = str(next(self._ids))
                msg.metadata.__dict__["_message_id"] = mid
                try:
                    reply = app(copy.deepcopy(msg), ctx)
                except Exception as e:  # as the Flower runtimes turn failures into replies
                    reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
                self._replies[mid] = reply
                ids.append(mid)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return [self._replies.pop(m) for m in message_ids if m in self._replies]

        def send_and_receive(self, messages: Iterable[Message], *,
                             timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
            return self.pull_messages(self.push_messages(messages))

    return InProcessGrid()


def tiers_mib(base: Path, aggregation: str) -> tuple[list[int] | None, list[int]]:
    """Each rank's estimated training peak in bytes (``--no-dp`` plan, unbounded), and
    the same rounded up to a MiB when that still separates the ranks (else ``None``:
    under ``ffa`` the ranks differ by less than a MiB; the phones then get the exact
    byte budgets through their node config, ``memory-budget-bytes``)."""
    from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings, rank_for_trainer
    from protocol import DpMode, RunConfig

    run = RunConfig(dp_mode=DpMode.NONE, lora_ranks=",".join(map(str, RANKS))).resolved()
    assert run.lora_alpha is not None
    lora = LoraSettings(rank=run.lora_rank, alpha=run.lora_alpha, ffa=aggregation == "ffa")
    trainer = LocalTrainer(base, lora)  # ffa: A frozen, half the trainable state
    settings = TrainSettings(batch_size=run.batch_size, seq_len=run.seq_len)
    need = [
        rank_for_trainer(
            trainer, allowed=(r,), settings=settings, dp=DPSettings()
        ).estimated_peak_bytes
        for r in RANKS
    ]
    tiers = [math.ceil(n / 2**20) for n in need]
    if any(tiers[i] * 2**20 >= need[i + 1] for i in range(len(RANKS) - 1)):
        return None, need
    return tiers, need


def run_row(aggregation: str, name: str, seed: int, rounds: int, base: Path, parts: Path,
            extra: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    from client.client_app import make_client_app
    from server.federation import FederationConfig, build_strategy, run_federation

    overrides = {"base-model": str(base), "data-dir": str(parts), "dp-mode": "none",
                 "num-server-rounds": rounds, "seed": seed, "aggregation": aggregation,
                 **extra}  # fmt: skip
    app = make_client_app(overrides)
    grid = _grid({10 + i: (app, node) for i, node in enumerate(nodes)})
    cfg = FederationConfig(num_rounds=rounds, dp_mode="none", seed=seed, aggregation=aggregation)
    t0 = time.monotonic()
    history = run_federation(grid, cfg, build_strategy(cfg))
    last = history[-1]
    per_rank: dict[str, float] = {}  # client-rounds trained at each rank
    for h in history[1:]:
        for k, v in h["train"].items():
            if k.startswith("clients-rank-"):
                per_rank[k] = per_rank.get(k, 0.0) + v
    return {
        "row": name,
        "aggregation": aggregation,
        "seed": seed,
        "clients-accuracy": last["evaluate"]["clients-accuracy"],
        "clients-loss": last["evaluate"]["clients-loss"],
        "heldout-accuracy": last["evaluate"]["heldout-accuracy"],
        "heldout-loss": last["evaluate"]["heldout-loss"],
        "base-clients-accuracy": history[0]["evaluate"]["clients-accuracy"],
        "upload-bytes-per-round": sum(h["train"]["upload-bytes"] for h in history[1:]) / rounds,
        "client-rounds-per-rank": per_rank,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--aggregation", choices=["fedavg", "ffa"], default="fedavg")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()

    import torch

    from simulation import ensure_base_model
    from simulation.data import SyntheticConfig, generate_synthetic, write_partitions

    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(os.environ.get("FEDOTA_CACHE") or Path.home() / ".cache" / "fedota")
            base = Path(ensure_base_model(cache, preset="tiny", seed=0))
            nf4 = base / "nf4" if (base / "nf4").is_dir() else base
            data = generate_synthetic(SyntheticConfig(num_clients=args.clients, seed=seed))
            parts = write_partitions(data, Path(tmp) / "parts")
            nodes = len(list(parts.glob("partition-*.json")))
            tiers, need = tiers_mib(nf4, args.aggregation)
            plain = [{"partition-id": i} for i in range(nodes)]
            budgets = [
                {**n, "memory-budget-bytes": need[i % len(RANKS)]} for i, n in enumerate(plain)
            ]
            plans: dict[str, dict[str, Any]] = {
                "all-low": {"lora-rank": RANKS[0]},
                "mixed": {
                    "lora-ranks": ",".join(map(str, RANKS)),
                    **({"client-memory-tiers-mib": ",".join(map(str, tiers))} if tiers else {}),
                },
                "all-high": {"lora-rank": RANKS[-1]},
            }
            for name, extra in plans.items():
                on = budgets if name == "mixed" and tiers is None else plain
                row = run_row(args.aggregation, name, seed, args.rounds, nf4, parts, extra, on)
                row["tiers-mib"] = tiers if name == "mixed" else None
                row["budgets-bytes"] = need if name == "mixed" and tiers is None else None
                if name == "mixed":  # every rank trained, or the row is not what it says
                    want = {f"clients-rank-{r}" for r in RANKS}
                    assert set(row["client-rounds-per-rank"]) == want, row
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"machine: {platform.machine()} {platform.processor()}, load {os.getloadavg()}")
    print(f"{'row':10} {'seed':>4} {'clients acc':>11} {'held-out acc':>12} {'upload B/round':>14}")
    for r in rows:
        print(f"{r['row']:10} {r['seed']:>4} {r['clients-accuracy']:>11.4f} "
              f"{r['heldout-accuracy']:>12.4f} {r['upload-bytes-per-round']:>14,.0f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
