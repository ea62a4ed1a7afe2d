"""Federated utility on real text every machine has: the Python standard library's docstrings.

The generator behind ``bench_federated.py`` was designed so that federated training has
something to learn, and the defaults were tuned on it. This benchmark asks the same
questions of real text (issue 25, item 7):

* the corpus is the docstrings of the standard library of the running interpreter
  (read with ``ast`` from the source files, nothing imported), one top-level module or
  package per phone (``email``, ``asyncio``, ``logging``...); modules with fewer than
  ``--min-docstrings`` docstrings are left out;
* the phones are split by a seeded shuffle into a **public half**, whose text pretrains
  the base model (``init_base_model``, what ``fedota base-model init --data`` runs), and a
  **federated half**, written as JSONL (``client_id``, ``text``) and loaded the way
  ``fedota simulate --data`` loads it (held-out text per phone, held-out phones);
* rows, evaluated the same way as ``bench_federated.py``: ``base``, ``local-only``,
  ``fed-no-dp``, ``fed-record-dp`` (ε = 8 per phone), ``fed-user-dp`` (ε = 8 over the
  federated population) and ``centralized`` (the pooled training text, as many steps as
  the federation ran).

The docstrings differ between Python versions, so the interpreter's version is printed
with the figures: compare runs only on the same version.

Usage::

    python benchmarks/bench_realtext.py                       # 5 rounds, 10 phones per round
    python benchmarks/bench_realtext.py --rounds 3 --out runs/realtext.json
    python benchmarks/bench_realtext.py --rows base,fed-no-dp # a subset of the rows
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import platform
import random
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

logger = logging.getLogger("bench_realtext")

ROWS = ("base", "local-only", "fed-no-dp", "fed-record-dp", "fed-user-dp", "centralized")

# Not library text a phone user would write: tests, the IDE, demos, generated tables.
_SKIP_TOP = frozenset(
    {"test", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}
)


def stdlib_docstrings(min_chars: int = 40) -> dict[str, list[str]]:
    """Docstrings of the standard library's source files, grouped by top-level module.

    Module, class and function docstrings, cleaned as ``inspect.getdoc`` does; files
    that do not parse (a few are templates) are skipped. Ordered by path, so the result
    is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    per_module: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP or rel.parts[0].startswith("config-"):
            continue
        if any(part in ("test", "tests") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        top = rel.parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    per_module[top].append(doc)
    return dict(per_module)


def split_corpus(
    per_module: dict[str, list[str]], *, min_docstrings: int, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({module: texts} to pretrain on, {phone: texts} to federate): a seeded half each."""
    phones = sorted(m for m, docs in per_module.items() if len(docs) >= min_docstrings)
    random.Random(seed).shuffle(phones)
    half = len(phones) // 2
    public, federated = sorted(phones[:half]), sorted(phones[half:])
    return {m: per_module[m] for m in public}, {m: per_module[m] for m in federated}


def write_jsonl(path: Path, phones: dict[str, list[str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for phone, texts in phones.items():
            for text in texts:
                f.write(json.dumps({"client_id": phone, "text": text}) + "\n")


def _bench_federated() -> ModuleType:
    """``bench_federated.py`` beside this file: its row runner and metrics are shared."""
    path = Path(__file__).with_name("bench_federated.py")
    spec = importlib.util.spec_from_file_location("bench_federated", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_federated"] = module
    spec.loader.exec_module(module)
    return module


def trainer_rows(
    bf: ModuleType, base: Path, data: Any, args: argparse.Namespace, wanted: set[str]
) -> dict[str, dict[str, Any]]:
    """base, local-only and centralized, with the trainer directly (as bench_federated)."""
    from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings

    trainer = LocalTrainer(base, LoraSettings(rank=8, alpha=16.0, init_seed=args.seed))
    rows: dict[str, dict[str, Any]] = {}
    rows["base"] = bf._metrics(trainer, None, data.clients, data.heldout_clients)
    if "local-only" in wanted:
        local = []
        for i, c in enumerate(data.clients):
            s = TrainSettings(
                local_steps=args.rounds * args.local_steps,
                seed=args.seed * 1000 + i,
                planned_rounds=1,
            )
            local.append(trainer.train(None, list(c.train), s, DPSettings()).adapter)
        rows["local-only"] = bf._metrics(trainer, local, data.clients, data.heldout_clients)
    if "centralized" in wanted:
        pooled = [t for c in data.clients for t in c.train]
        steps = args.rounds * args.clients_per_round * args.local_steps
        s = TrainSettings(local_steps=steps, seed=args.seed)
        central = trainer.train(None, pooled, s, DPSettings()).adapter
        rows["centralized"] = bf._metrics(trainer, central, data.clients, data.heldout_clients)
    return rows


def federated_rows(
    bf: ModuleType,
    base: Path,
    data_file: Path,
    out: Path,
    args: argparse.Namespace,
    wanted: set[str],
) -> dict[str, dict[str, Any]]:
    plan = SimpleNamespace(rounds=args.rounds, heldout_clients=0)
    extra = dict(item.split("=", 1) for item in args.set)
    common = dict(data_file=data_file, clients_per_round=args.clients_per_round, extra=extra)
    no_dp = dict(dp_mode="none", aggregation="fedavg", local_steps=args.local_steps)
    runs = {
        "fed-no-dp": {**no_dp, "learning_rate": args.learning_rate},
        "fed-record-dp": dict(dp_mode="record", target_epsilon=8.0, aggregation="ffa"),
        "fed-user-dp": dict(dp_mode="user", target_epsilon=8.0, aggregation="ffa"),
    }
    rows = {}
    for name, kw in runs.items():
        if name in wanted:
            logger.info("%s ...", name)
            rows[name] = bf.federated_row(name, base, out, plan, args.seed, **kw, **common)
    return rows


def shares(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each row's accuracy gain over the base, and its share of the centralized gain."""
    base = rows["base"]["eval_accuracy"]
    gain = {k: r["eval_accuracy"] - r.get("baseline_accuracy", base) for k, r in rows.items()}
    out = {f"{k}_gain": round(v, 4) for k, v in gain.items() if k != "base"}
    if gain.get("centralized"):
        for k in ("local-only", "fed-no-dp", "fed-record-dp", "fed-user-dp"):
            if k in gain:
                out[f"{k}_share_of_centralized"] = round(gain[k] / gain["centralized"], 3)
    if gain.get("fed-no-dp"):
        for k in ("fed-record-dp", "fed-user-dp"):
            if k in gain:
                out[f"{k}_share_of_fed_no_dp"] = round(gain[k] / gain["fed-no-dp"], 3)
    return out


def report(result: dict[str, Any]) -> str:
    c = result["corpus"]
    lines = [
        f"real text: Python {c['python']} standard-library docstrings; "
        f"{c['public_phones']} public modules ({c['public_chars']:,} chars) pretrain the base, "
        f"{c['federated_phones']} modules are phones ({c['federated_chars']:,} chars); "
        f"{result['train_clients']} training phones, {result['heldout_clients']} held out",
        f"rounds {result['args']['rounds']}, {result['args']['clients_per_round']} phones per "
        f"round, seed {result['args']['seed']}; base pretraining "
        f"{result['base']['steps']} steps, final loss {result['base']['final_loss']:.3f}",
        "",
        "| row | eval loss | eval acc | held-out phones loss | held-out phones acc | ε |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        eps = r.get("epsilon")
        lines.append(
            f"| {name} | {r['eval_loss']:.4f} | {r['eval_accuracy']:.4f} | "
            f"{r['heldout_clients_loss']:.4f} | {r['heldout_clients_accuracy']:.4f} | "
            f"{'-' if eps is None else f'{eps:.2f}'} |"
        )
    lines += ["", *(f"{k}: {v}" for k, v in result["shares"].items())]
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def _preset(args: argparse.Namespace) -> Any:
    """The base preset with ``--base-lr`` applied."""
    import dataclasses

    from simulation import PRESETS

    preset = PRESETS[args.preset]
    if args.base_lr is None:
        return preset
    return dataclasses.replace(preset, learning_rate=args.base_lr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10, help="of the no-DP and local rows")
    p.add_argument(
        "--learning-rate", type=float, help="of the no-DP federated row (default: its mode's)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key for every federated row, e.g. strategy=fedavgm (repeatable)",
    )
    p.add_argument("--min-docstrings", type=int, default=12, help="a module's least to be a phone")
    p.add_argument("--preset", default="tiny", help="base model preset (tiny | small)")
    p.add_argument(
        "--base-steps", type=int, help="pretraining steps of the base (default: as base-model init)"
    )
    p.add_argument(
        "--base-lr", type=float, help="pretraining learning rate (default: the preset's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    p.add_argument("--out", type=Path, help="write the result as JSON here too")
    p.add_argument("--work", type=Path, help="keep the base and runs here (default: temporary)")
    args = p.parse_args(argv)
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()} | {"base"}
    if unknown := wanted - set(ROWS):
        p.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.monotonic()
    bf = _bench_federated()
    from simulation import FederatedConfig, init_base_model, load_data

    public_modules, phones = split_corpus(
        stdlib_docstrings(), min_docstrings=args.min_docstrings, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="fedota-realtext-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_file = work / "federated.jsonl"
        write_jsonl(data_file, phones)
        public = [t for texts in public_modules.values() for t in texts]
        base = work / "base"
        if not (base / "fedota_base.json").exists():
            logger.info("pretraining the base on %d public docstrings ...", len(public))
            init_base_model(
                base, public_texts=public, preset=_preset(args), seed=args.seed,
                steps=args.base_steps,
                data_label="python-stdlib-docstrings (public half)",
            )  # fmt: skip
        info = json.loads((base / "fedota_base.json").read_text())
        data = load_data(FederatedConfig(out_dir=work / "probe", data_file=data_file))
        rows = trainer_rows(bf, base, data, args, wanted)
        rows |= federated_rows(bf, base, data_file, work / "runs", args, wanted)
    ordered = {k: rows[k] for k in ROWS if k in rows}
    result = {
        "corpus": {
            "python": platform.python_version(),
            "public_phones": len(public_modules),
            "public_chars": sum(len(t) for ts in public_modules.values() for t in ts),
            "federated_phones": len(phones),
            "federated_chars": sum(len(t) for ts in phones.values() for t in ts),
        },
        "train_clients": len(data.clients),
        "heldout_clients": len(data.heldout_clients),
        "base": {"steps": info.get("steps"), "final_loss": info.get("final_loss")},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": ordered,
        "shares": shares(ordered),
        "wall_s": time.monotonic() - started,
    }
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
