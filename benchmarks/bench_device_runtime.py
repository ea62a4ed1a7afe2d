"""The device runtime on llama.cpp vs the NF4 runtime vs llama.cpp's own ceiling (issue 26).

Side by side in one run, same prompts, same thread count (1 and 2), each configuration
in its own fresh process so peak memory is not polluted by the others:

* ``nf4``       — ``QuantizedRuntime`` (transformers + bitsandbytes NF4 + PEFT);
* ``llamacpp``  — ``LlamaCppRuntime`` on GGUF exports of the same NF4 weights (Q4_0, Q8_0);
* ``llama-bench`` — llama.cpp's own benchmark on the same GGUF files, built from the same
  source and flags (``benchmarks/build_llama_bench.sh``): the ceiling.

Per configuration: decode tokens/s (greedy, after the first token), time to first token
for a 64-token prompt (tokenization and prefill included), peak memory added (RSS above
the process after importing the libraries; for llama-bench the whole process's max
RSS), adapter apply time (first attach of a verified adapter: GGUF LoRA written and
loaded on llama.cpp) and swap time (between two adapters already loaded). Then the
held-out loss of base + adapter on the tiny base (trained; the 0.5B shape has random
weights, so its loss means nothing) for NF4 and GGUF Q8_0 / Q4_0 / Q4_K_M.

Models: the project's tiny base, and (unless ``--quick``) a Qwen2.5-0.5B-shaped model with
random weights (see ``bench_runtime.py``). Prompts are Python standard-library docstrings.

    python benchmarks/bench_device_runtime.py [--quick] [--threads 1,2] [--new-tokens 64]
        [--llama-bench PATH] [--out runs/bench_device_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_runtime import _ensure_qwen_shape, _tiny_base

MIB = 1 << 20
QUANTS_SPEED = ("q4_0", "q8_0")
# (quant, source): the GGUF of the NF4 weights phones train on, and of the float ones (ADR 0011).
QUANTS_LOSS = (("q8_0", "nf4"), ("q4_0", "nf4"), ("q4_k_m", "nf4"), ("q8_0", "float"))
PROMPT_TOKENS = 64
DOC_MODULES = ("json", "textwrap", "argparse", "pathlib", "collections", "itertools", "heapq")


# ---------------------------------------------------------------- shared inputs
def _docstring_text() -> str:
    """Real English text every machine has: standard-library docstrings."""
    import importlib

    parts = [pydoc.getdoc(importlib.import_module(m)) for m in DOC_MODULES]
    return re.sub(r"\s+", " ", " ".join(parts))


def _prompts(model_dir: Path, count: int) -> list[str]:
    """``count`` distinct prompts of exactly ``PROMPT_TOKENS`` tokens (BOS included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    words, out, start = _docstring_text().split(" "), [], 0
    while len(out) < count:
        n = 8
        while len(tok(" ".join(words[start : start + n]))["input_ids"]) < PROMPT_TOKENS:
            n += 1
        text = " ".join(words[start : start + n])
        while len(tok(text)["input_ids"]) > PROMPT_TOKENS:  # a long last word: trim chars
            text = text[:-1]
        out.append(text)
        start += n
    return out


def _heldout() -> list[str]:
    from simulation.data import generate_public_texts

    return list(generate_public_texts(48, seed=4242))


def _adapter(nf4_dir: Path, rank: int, seed: int) -> dict[str, Any]:
    """A LoRA on every attention and MLP projection whose effect on the loss is visible
    (``lora_B`` scaled so base + adapter differs from the base by a few percent)."""
    import numpy as np

    cfg = json.loads((nf4_dir / "config.json").read_text())
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    kv = int(cfg["num_key_value_heads"]) * head_dim
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for i in range(int(cfg["num_hidden_layers"])):
        for module, (n_in, n_out) in shapes.items():
            stem = f"base_model.model.model.layers.{i}.{module}"
            a = rng.normal(size=(rank, n_in)) / np.sqrt(n_in)
            out[f"{stem}.lora_A.weight"] = a.astype(np.float32)
            out[f"{stem}.lora_B.weight"] = (rng.normal(size=(n_out, rank)) * 0.02).astype(
                np.float32
            )
    return out


def _ensure_gguf(root: Path, quant: str, source: str = "nf4") -> Path:
    """The GGUF export of the base at ``root`` (by default from its NF4 weights, ADR
    0011; ``float``: from the float checkpoint), made once."""
    from client.runtime import export_gguf

    path = root / f"gguf-{quant}{'' if source == 'nf4' else '-from-' + source}.gguf"
    if not path.is_file():
        print(f"… exporting {root.name} to {quant} from {source} weights", file=sys.stderr)
        export_gguf(root / "nf4" if source == "nf4" else root, path, quant=quant, source=source)
    return path


# ---------------------------------------------------------------- worker processes
def _speed(rt: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    rt.generate(prompts[0], 4)  # warm-up: first-call allocations, kernels
    ttft, decode, peak = [], [], int(rt.load_peak_added_bytes)
    for p in prompts:
        g = rt.generate(p, new_tokens)
        ttft.append(g.first_token_s)
        if g.new_tokens > 1:
            decode.append((g.new_tokens - 1) / (g.seconds - g.first_token_s))
        peak = max(peak, int(g.peak_added_bytes))
    return {
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(ttft),
        "peak_added_bytes": peak,
        "requests": len(prompts),
    }


def _adapter_times(rt: Any, nf4_dir: Path) -> dict[str, float]:
    from protocol import LoraShape

    spec = LoraShape(rank=8, alpha=16.0)
    one, two = _adapter(nf4_dir, 8, 1), _adapter(nf4_dir, 8, 2)
    apply_s = [rt.set_adapter(one, spec, version=1), rt.set_adapter(two, spec, version=2)]
    swap_s = [rt.set_adapter(state, spec) for state in (one, two, one, two, one)]
    return {"apply_s": statistics.median(apply_s), "swap_s": statistics.median(swap_s)}


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    model, nf4_dir = Path(args.model), Path(args.nf4)
    prompts = json.loads(Path(args.prompts_file).read_text())
    if args.mode == "llama-bench":
        return _llama_bench(args.llama_bench, model, args.threads, args.new_tokens)
    if args.mode == "nf4":
        import torch

        from client.runtime import QuantizedRuntime, warm_up_libraries

        torch.set_num_threads(args.threads)
        warm_up_libraries()
        rt: Any = QuantizedRuntime(model)
    else:
        from client.runtime import LlamaCppRuntime

        rt = LlamaCppRuntime(model, threads=args.threads)
    if args.loss:
        from protocol import LoraShape

        texts = _heldout()
        base = rt.evaluate(texts).loss
        rt.set_adapter(_adapter(nf4_dir, 8, 1), LoraShape(rank=8, alpha=16.0))
        return {"loss_base": base, "loss_adapter": rt.evaluate(texts).loss}
    out = _speed(rt, prompts, args.new_tokens)
    out.update(_adapter_times(rt, nf4_dir))
    rt.close()
    return out


def _llama_bench(binary: str, gguf: Path, threads: int, new_tokens: int) -> dict[str, Any]:
    cmd = [binary, "-m", str(gguf), "-p", str(PROMPT_TOKENS), "-n", str(new_tokens)]
    cmd += ["-t", str(threads), "-r", "5", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "decode_tok_s": float(tg["avg_ts"]),
        "ttft_s": PROMPT_TOKENS / float(pp["avg_ts"]),  # prefill of 64 tokens
        "prefill_tok_s": float(pp["avg_ts"]),
        "process_max_rss_bytes": max_rss,
    }


def _run_worker(**kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker"]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kw} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- driver
def _machine() -> dict[str, Any]:
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni")
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": [w for w in wanted if w in flags.split()],
        "loadavg_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _bench_model(name: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    nf4 = root / "nf4"
    prompts_file = root / "bench-prompts.json"
    prompts_file.write_text(json.dumps(_prompts(nf4, args.prompts)))
    ggufs = {q: _ensure_gguf(root, q) for q in QUANTS_SPEED}
    common = dict(nf4=nf4, prompts_file=prompts_file, new_tokens=args.new_tokens)
    rows = []
    for threads in args.threads:
        configs: list[tuple[str, str, Path]] = [("nf4", "NF4 runtime", nf4)]
        configs += [("llamacpp", f"llama.cpp runtime {q}", g) for q, g in ggufs.items()]
        if args.llama_bench:
            configs += [("llama-bench", f"llama-bench {q}", g) for q, g in ggufs.items()]
        for mode, label, model in configs:
            print(f"… {name} {label} at {threads} threads", file=sys.stderr)
            got = _run_worker(
                mode=mode, model=model, threads=threads, llama_bench=args.llama_bench, **common
            )
            rows.append({"model": name, "path": label, "threads": threads, **got})
    return rows


def _loss_rows(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    nf4 = root / "nf4"
    prompts_file = root / "bench-prompts.json"
    common = dict(nf4=nf4, prompts_file=prompts_file, new_tokens=1, threads=2, loss=True)
    rows = [{"path": "NF4 runtime", **_run_worker(mode="nf4", model=nf4, **common)}]
    for quant, source in QUANTS_LOSS:
        gguf = _ensure_gguf(root, quant, source)
        label = f"llama.cpp {quant} from {source}"
        rows.append({"path": label, **_run_worker(mode="llamacpp", model=gguf, **common)})
    return rows


def _print(rows: list[dict[str, Any]], losses: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<20}{'thr':>4} {'path':<24}{'decode tok/s':>13}{'vs NF4':>8}"
        f"{'vs ceiling':>11}{'TTFT ms':>9}{'peak MiB':>10}{'apply ms':>10}{'swap ms':>9}"
    )
    nan = float("nan")
    for r in rows:
        same = [x for x in rows if x["model"] == r["model"] and x["threads"] == r["threads"]]
        nf4 = next(x for x in same if x["path"] == "NF4 runtime")
        quant = r["path"].split()[-1]
        ceiling = next((x for x in same if x["path"] == f"llama-bench {quant}"), None)
        vs_ceiling = (
            f"{r['decode_tok_s'] / ceiling['decode_tok_s']:.2f}"
            if ceiling and r["path"].startswith("llama.cpp")
            else "-"
        )
        peak = r.get("peak_added_bytes", r.get("process_max_rss_bytes", 0))
        mark = "*" if "process_max_rss_bytes" in r else ""
        print(
            f"{r['model']:<20}{r['threads']:>4} {r['path']:<24}{r['decode_tok_s']:>13.1f}"
            f"{r['decode_tok_s'] / nf4['decode_tok_s']:>8.1f}{vs_ceiling:>11}"
            f"{r['ttft_s'] * 1e3:>9.0f}{peak / MIB:>9.0f}{mark:1}"
            f"{r.get('apply_s', nan) * 1e3:>10.1f}{r.get('swap_s', nan) * 1e3:>9.2f}"
        )
    print("* llama-bench: the whole process's max RSS (others: memory added to the process)")
    if losses:
        ref = losses[0]["loss_adapter"]
        print(f"\nheld-out loss, tiny base (48 texts): {'base':>8}{'+adapter':>10}{'vs NF4':>9}")
        for r in losses:
            print(
                f"  {r['path']:<34}{r['loss_base']:>8.4f}{r['loss_adapter']:>10.4f}"
                f"{(r['loss_adapter'] / ref - 1) * 100:>+8.2f}%"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer prompts")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--prompts", type=int, default=5, help="64-token prompts per config")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (the ceiling)")
    ap.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_device_runtime.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="nf4", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nf4", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--loss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(_worker(args)))
        return
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 2), min(args.new_tokens, 16)
    machine = _machine()
    tiny = _tiny_base(args.cache)
    rows = _bench_model("tiny", tiny, args)
    if not args.quick:
        rows += _bench_model("qwen2.5-0.5b-shape", _ensure_qwen_shape(args.cache), args)
    losses = _loss_rows(tiny, args)
    machine["loadavg_end"] = list(os.getloadavg())
    print(
        f"{machine['date']} · {machine['cpu']} · {machine['cores']} cores · flags "
        f"{' '.join(machine['flags'])} · load {machine['loadavg_start'][0]:.2f} → "
        f"{machine['loadavg_end'][0]:.2f}"
    )
    _print(rows, losses)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows, "loss": losses}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
