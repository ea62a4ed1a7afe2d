"""On-device training cost (issue 3 benchmarks, trainer half).

Side by side in one run, same base, data, seed and LoRA (r=8, all linear projections):

* ``nf4``          NF4 base + LoRA, plain AdamW step
* ``nf4-dp``       NF4 base + LoRA, DP-SGD (Opacus per-sample gradient hooks)
* ``nf4-dp-ghost`` NF4 base + LoRA, DP-SGD with Opacus fast gradient ("ghost") clipping
* ``fp32``         fp32 base + LoRA, plain step (the unquantized baseline)
* ``fp32-dp``      fp32 base + LoRA, DP-SGD (hooks)

Every text is longer than a block, so plain training (texts packed into blocks) and
DP training (one text per block) cut the same blocks, checked before timing: a DP step
does the same work as a plain one and the ratio is the cost of DP-SGD alone.

Seconds per step are measured through the public API: the median over repeats of
(time(train with K2 steps) - time(train with K1 steps)) / (K2 - K1), which cancels
the fixed per-round cost (packing, Opacus wrapping, accounting); configs are
interleaved within each repeat so machine load affects them alike. Peak memory: the
process RSS sampled every 5 ms during one round, minus the RSS just before it (a fresh
interpreter per config in the full run; in-process with ``--quick``), beside the
trainer's own estimate (``TrainResult.estimated_peak_bytes`` minus the weights).

Both the process CPU time and the wall time are recorded (one torch thread); the
ratios use CPU time, which other tenants of a shared machine barely disturb.

Ratios reported: DP / plain (NF4, hooks and ghost) and NF4 / fp32 (plain).

Usage::

    python benchmarks/bench_client_train.py --quick     # hidden 64 / 2 layers, < 60 s
    python benchmarks/bench_client_train.py             # the ``tiny`` preset's shape
    python benchmarks/bench_client_train.py --base DIR --out runs/bench_client_train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings

logger = logging.getLogger("bench_client_train")
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    name: str
    quantized: bool
    dp: DPSettings


CONFIGS = (
    Config("nf4", True, DPSettings()),
    Config("nf4-dp", True, DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp")),
    Config(
        "nf4-dp-ghost",
        True,
        DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp", grad_sample_mode="ghost"),
    ),
    Config("fp32", False, DPSettings()),
    Config("fp32-dp", False, DPSettings(enabled=True, noise_multiplier=1.0, accountant="rdp")),
)


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


QUICK_SHAPE = Shape(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


def preset_shape(name: str) -> Shape:
    """The architecture of a ``simulation.base_model`` preset (weights are random here)."""
    from simulation import PRESETS

    p = PRESETS[name]
    return Shape(p.vocab_size, p.hidden_size, p.num_layers, p.num_heads, p.num_kv_heads,
                 p.intermediate_size)  # fmt: skip


def build_random_base(out: Path, shape: Shape = QUICK_SHAPE) -> Path:
    """A random-weight Llama of ``shape`` with a byte-level BPE tokenizer.

    Step time and memory do not depend on the weights' values, so a random base of
    the preset's shape measures the same as the pretrained one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(synthetic_texts(400, seed=1), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def synthetic_texts(n: int, seed: int, sentences: int = 8) -> list[str]:
    """``n`` texts of ``sentences`` short sentences each (about 100 tokens).

    Every text is longer than a block, so packed (plain) and one-text-per-block (DP)
    training cut the same blocks and a step does the same work in both: the step-time
    ratio is the cost of DP-SGD, not of a different number of tokens.
    """
    import random

    rng = random.Random(seed)
    subjects = ["the user", "my friend", "a neighbour", "the team", "our family"]
    verbs = ["books a table at", "walks to", "reads about", "writes to", "drives to"]
    objects = ["the station", "the old library", "a small cafe", "the market", "the clinic"]
    return [
        " ".join(
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
            f"at {rng.randrange(24)}:00."
            for _ in range(sentences)
        )
        for _ in range(n)
    ]


def check_equal_work(base: Path, texts: list[str], seq_len: int) -> int:
    """Tokens per block row; raises when plain and DP training would cut different blocks."""
    from transformers import AutoTokenizer

    from client.train import pack_texts

    tokenizer = AutoTokenizer.from_pretrained(base)
    packed = pack_texts(tokenizer, texts, seq_len).trimmed()
    per_text = pack_texts(tokenizer, texts, seq_len, pack=False).trimmed()
    if not torch.equal(packed.input_ids, per_text.input_ids):
        raise RuntimeError(
            "plain and DP training would train on different blocks, so their step times "
            "would not compare the same work; use texts longer than --seq-len tokens"
        )
    return int(packed.input_ids.shape[1])


class PeakRss:
    """Samples this process' RSS in a thread; ``peak - start`` is the round's growth."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _timed(
    trainer: LocalTrainer, texts: list[str], steps: int, cfg: Config, args: Any
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training round."""
    settings = TrainSettings(
        local_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=0
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = trainer.train(None, texts, settings, cfg.dp)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.status != "ok":
        raise RuntimeError(f"{cfg.name}: {result.status}: {result.message}")
    return wall, cpu


def step_times(
    configs: tuple[Config, ...], trainers: dict[str, LocalTrainer], texts: list[str], args: Any
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step for every config, interleaved so load hits all alike."""
    for c in configs:  # warm-up: imports, allocator, Opacus wrapping
        _timed(trainers[c.name], texts, 1, c, args)
    times: dict[str, dict[str, list[float]]] = {c.name: {"wall": [], "cpu": []} for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            short = _timed(trainers[c.name], texts, args.k1, c, args)
            long = _timed(trainers[c.name], texts, args.k2, c, args)
            times[c.name]["wall"].append((long[0] - short[0]) / (args.k2 - args.k1))
            times[c.name]["cpu"].append((long[1] - short[1]) / (args.k2 - args.k1))
    return times


def make_trainer(cfg: Config, base: Path) -> LocalTrainer:
    return LocalTrainer(base, LoraSettings(rank=8, alpha=16.0), quantized=cfg.quantized)


def memory_row(cfg: Config, trainer: LocalTrainer, texts: list[str], args: Any) -> dict[str, float]:
    """Peak RSS growth of one training round, beside the trainer's own estimate."""
    import opacus.utils.batch_memory_manager
    import opacus.utils.fast_gradient_clipping_utils  # noqa: F401  (imports are not training)

    settings = TrainSettings(local_steps=args.k1, batch_size=args.batch_size, seq_len=args.seq_len)
    with PeakRss() as rss:
        result = trainer.train(None, texts, settings, cfg.dp)
    return {
        "weights_mib": trainer.footprint.weights_bytes / MIB,
        "train_peak_rss_growth_mib": (rss.peak - rss.start) / MIB,
        "process_peak_rss_mib": rss.peak / MIB,
        "estimated_train_mib": (result.estimated_peak_bytes - trainer.footprint.weights_bytes)
        / MIB,
    }


def memory_in_subprocess(cfg: Config, base: Path, args: Any) -> dict[str, float]:
    """Run :func:`memory_row` in a fresh interpreter, so no earlier config's heap counts."""
    cmd = [sys.executable, __file__, "--memory-worker", cfg.name, "--base", str(base)]
    cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Step-time ratios on CPU seconds (robust to other processes on a shared machine)."""

    def r(a: str, b: str) -> float:
        return rows[a]["cpu_seconds_per_step"] / rows[b]["cpu_seconds_per_step"]

    return {
        "dp_hooks_over_plain_nf4": r("nf4-dp", "nf4"),
        "dp_ghost_over_plain_nf4": r("nf4-dp-ghost", "nf4"),
        "nf4_over_fp32_plain": r("nf4", "fp32"),
        "dp_hooks_over_plain_fp32": r("fp32-dp", "fp32"),
    }


def _base_and_texts(args: Any, tmp: Path) -> tuple[Path, list[str]]:
    texts = synthetic_texts(args.texts, seed=2)
    if args.base:
        return Path(args.base), texts
    shape = QUICK_SHAPE if args.quick else preset_shape(args.preset)
    return build_random_base(tmp / "base", shape), texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random base, few repeats")
    parser.add_argument("--base", help="HF base directory (default: random, preset shape)")
    parser.add_argument("--preset", default="tiny", help="simulation preset shape to build")
    parser.add_argument("--out", default="runs/bench_client_train.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats, args.k1, args.k2 = (3, 1, 7) if args.quick else (5, 3, 13)
    args.batch_size, args.seq_len = 8, (32 if args.quick else 64)
    args.texts = 60 if args.quick else 120
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in CONFIGS}
    if args.memory_worker:
        texts = synthetic_texts(args.texts, seed=2)
        cfg = by_name[args.memory_worker]
        row = memory_row(cfg, make_trainer(cfg, Path(args.base)), texts, args)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base, texts = _base_and_texts(args, Path(tmp))
        width = check_equal_work(base, texts, args.seq_len)
        trainers = {c.name: make_trainer(c, base) for c in CONFIGS}
        times = step_times(CONFIGS, trainers, texts, args)
        memory = {
            c.name: memory_row(c, trainers[c.name], texts, args)
            if args.quick
            else memory_in_subprocess(c, base, args)
            for c in CONFIGS
        }
    rows = {
        c.name: {
            "config": c.name,
            "cpu_seconds_per_step": statistics.median(times[c.name]["cpu"]),
            "wall_seconds_per_step": statistics.median(times[c.name]["wall"]),
            "cpu_seconds_per_step_all": times[c.name]["cpu"],
            "wall_seconds_per_step_all": times[c.name]["wall"],
            **memory[c.name],
        }
        for c in CONFIGS
    }
    summary = {
        "machine": {"cpus": psutil.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]},
        "settings": {"quick": args.quick, "base": args.base or f"random {args.preset} shape",
                     "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "block_width": width, "same_blocks_plain_and_dp": True,
                     "lora_rank": 8, "repeats": args.repeats, "k1": args.k1, "k2": args.k2,
                     "memory": "in-process" if args.quick else "fresh subprocess per config"},
        "rows": rows,
        "ratios": ratios(rows),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(report(summary))
    return 0


def report(summary: dict[str, Any]) -> str:
    """The side-by-side table docs/benchmarks.md quotes ("On-device training step")."""
    lines = [
        f"{'config':<14}{'cpu s/step':>11}{'wall s/step':>12}{'weights MiB':>13}"
        f"{'train RSS MiB':>15}{'est. MiB':>10}"
    ]
    for row in summary["rows"].values():
        lines.append(
            f"{row['config']:<14}{row['cpu_seconds_per_step']:>11.4f}"
            f"{row['wall_seconds_per_step']:>12.4f}{row['weights_mib']:>13.2f}"
            f"{row['train_peak_rss_growth_mib']:>15.1f}{row['estimated_train_mib']:>10.1f}"
        )
    lines += [f"{name:<28}{value:>7.2f}x" for name, value in summary["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
