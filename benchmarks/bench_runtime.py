"""Memory-budgeted runtime vs the naive path (issue 6 benchmark).

Side by side, one run, each configuration in its own fresh process so peak RSS is not
polluted by the others:

* ``naive``  — ``AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4)``
  (quantize at load) + ``model.generate``;
* ``fedota`` — ``QuantizedRuntime(nf4_dir, budget_bytes=B)`` at three budgets.

For every configuration: peak memory added (peak RSS minus RSS after importing the
libraries), median tokens/s per request over the same prompts of varied length, and
budget violations (requests whose measured peak exceeded the budget). Then the time to
apply an update: hot-swapping a LoRA adapter vs reloading the model with it.

Models: the project's tiny base, and (unless ``--quick``) a Qwen2.5-0.5B-shaped model
with random weights (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocab 151936), built once under ``--cache``.

    python benchmarks/bench_runtime.py [--quick] [--prompts 50] [--out runs/bench_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
_TEXT = (
    "hey ana are we still on for coffee at the blue door tonight the city council "
    "approved a plan for new schools running late see you at river park"
)
WORDS = tuple(_TEXT.split(" "))
QWEN_SHAPE = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def _prompts(n: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, max_words))) for _ in range(n)]


def _ensure_qwen_shape(cache: Path) -> Path:
    """A random-weight Qwen2 model of the 0.5B shape, float + NF4 copy, built once."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from client.runtime import quantize_checkpoint

    out = cache / "qwen2.5-0.5b-shape"
    if (out / "nf4" / "config.json").is_file():
        return out
    tiny = _tiny_base(cache)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_SHAPE))  # type: ignore[arg-type]
    model.save_pretrained(out)
    del model
    # Any tokenizer will do for speed/memory; the tiny base's ids fit the big vocab.
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    quantize_checkpoint(out, out / "nf4")
    return out


def _tiny_base(cache: Path) -> Path:
    from simulation import ensure_base_model

    return ensure_base_model(cache, preset="tiny", seed=0)


# ---------------------------------------------------------------- worker processes
def _worker(args: argparse.Namespace) -> dict[str, Any]:
    from client.runtime import MemoryMeter, warm_up_libraries

    warm_up_libraries()
    prompts = _prompts(args.prompts, args.max_words)
    if args.mode == "naive":
        return _naive(Path(args.model), prompts, args.new_tokens, MemoryMeter.start())
    return _fedota(Path(args.model), prompts, args.new_tokens, args.budget_mb * MIB)


def _naive(model_dir: Path, prompts: list[str], new_tokens: int, meter: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.runtime import nf4_config, release_free_memory

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=nf4_config(), device_map="cpu"
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    rates = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                min_new_tokens=new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t0))
        release_free_memory()
    return {
        "peak_added_bytes": meter.peak_added_bytes(),
        "tokens_per_s": statistics.median(rates),
        "violations": None,
        "requests": len(prompts),
    }


def _fedota(nf4_dir: Path, prompts: list[str], new_tokens: int, budget: int) -> dict[str, Any]:
    from client.runtime import QuantizedRuntime
    from protocol import LoraShape

    rt = QuantizedRuntime(nf4_dir, budget_bytes=budget, policy="sliding-window")
    peak, violations, rates = rt.load_peak_added_bytes, 0, []
    for p in prompts:
        g = rt.generate(p, new_tokens)
        peak = max(peak, g.peak_added_bytes)
        violations += g.peak_added_bytes > budget
        rates.append(g.new_tokens / g.seconds)
    spec = LoraShape(rank=8, alpha=16.0)
    swap_s = [rt.set_adapter(_random_adapter(rt, spec, seed), spec) for seed in range(3)]
    t0 = time.perf_counter()
    del rt
    again = QuantizedRuntime(nf4_dir, budget_bytes=budget)
    again.set_adapter(_random_adapter(again, spec, 9), spec)
    reload_s = time.perf_counter() - t0
    return {
        "peak_added_bytes": peak,
        "tokens_per_s": statistics.median(rates),
        "violations": int(violations),
        "requests": len(prompts),
        "capacity_tokens": again.capacity,
        "hot_swap_s": statistics.median(swap_s),
        "reload_s": reload_s,
    }


def _random_adapter(rt: Any, spec: Any, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in rt.model.named_modules():
        if hasattr(module, "in_features") and name.split(".")[-1].endswith("proj"):
            stem = f"base_model.model.{name}"
            out[f"{stem}.lora_A.weight"] = (
                torch.randn(spec.rank, module.in_features, generator=gen).numpy() * 0.01
            )
            out[f"{stem}.lora_B.weight"] = (
                torch.randn(module.out_features, spec.rank, generator=gen).numpy() * 0.01
            )
    return out


def _run_worker(**kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kw} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- driver
def _budgets_mb(nf4_dir: Path) -> list[int]:
    """Three budgets: just above the planner's minimum, +25 %, +60 %."""
    from client.runtime import BudgetTooSmallError, footprint_from_checkpoint, plan_memory

    try:
        plan_memory(footprint_from_checkpoint(nf4_dir), 1, adapter_bytes=0)
    except BudgetTooSmallError as e:
        # the runtime also reserves room for a rank-16 adapter; leave ample margin
        floor = e.needed_bytes / MIB + 8
    return [int(floor * f) for f in (1.1, 1.25, 1.6)]


def _bench_model(name: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    budgets_mb = _budgets_mb(root / "nf4")
    common = dict(prompts=args.prompts, max_words=args.max_words, new_tokens=args.new_tokens)
    rows = [
        {
            "model": name,
            "path": "naive (NF4 at load + generate)",
            "budget_mb": None,
            **_run_worker(mode="naive", model=root, budget_mb=0, **common),
        }
    ]
    for mb in budgets_mb:
        rows.append(
            {
                "model": name,
                "path": "fedota runtime",
                "budget_mb": mb,
                **_run_worker(mode="fedota", model=root / "nf4", budget_mb=mb, **common),
            }
        )
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<22}{'path':<32}{'budget MiB':>11}{'peak MiB':>10}{'vs naive':>9}"
        f"{'tok/s':>8}{'vs naive':>9}{'viol.':>6}{'swap ms':>9}{'reload ms':>10}"
    )
    naive: dict[str, dict[str, Any]] = {}
    for r in rows:
        base = naive.setdefault(r["model"], r)
        print(
            f"{r['model']:<22}{r['path']:<32}{r['budget_mb'] or '-':>11}"
            f"{r['peak_added_bytes'] / MIB:>10.1f}"
            f"{r['peak_added_bytes'] / base['peak_added_bytes']:>9.2f}"
            f"{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}"
            f"{'-' if r['violations'] is None else r['violations']:>6}"
            f"{r.get('hot_swap_s', 0) * 1e3:>9.1f}{r.get('reload_s', 0) * 1e3:>10.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer prompts")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-words", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_runtime.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fedota", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--budget-mb", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 8), min(args.new_tokens, 8)
    rows = _bench_model("tiny", _tiny_base(args.cache), args)
    if not args.quick:
        rows += _bench_model("qwen2.5-0.5b-shape", _ensure_qwen_shape(args.cache), args)
    _print(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
