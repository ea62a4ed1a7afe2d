"""Bundle sizes, packaging/apply time and int8 accuracy cost (issue 4 benchmarks).

Two models, side by side in one run:

* **tiny** — the shape of fedota's ``tiny`` base preset (hidden 192, 4 layers, 6 heads,
  2 KV heads, intermediate 512, vocab 2048), random init. LoRA r=8 on all linear
  projections is trained for real with PEFT: a few federated rounds (3 clients x
  ``local_steps`` AdamW steps on synthetic sequences, FedAvg of A and B). The round's
  update statistics (RMS of A, B, dA, dB) are measured here.
* **qwen0.5b** — Qwen2.5-0.5B's published config (hidden 896, 24 layers, 14 heads,
  2 KV heads, intermediate 4864, vocab 151936, tied embeddings, q/k/v biases) with
  random weights. LoRA r=8 tensors are generated with the PEFT init for A and the
  tiny model's measured statistics for B, dA and dB (Gaussian), so the "one realistic
  round" delta uses the update statistics measured on the tiny model.

Columns: NF4 base checkpoint bytes · PEFT ``save_pretrained`` adapter (fp32, fp16) ·
fedota ``full`` bundle (int8) · fedota ``delta`` bundle after one round (int8) ·
packaging and apply time · eval-loss change of the device-reconstructed adapter (tiny).

NF4 base bytes: exact arithmetic from the shapes (bitsandbytes NF4, blocksize 64,
double quantization with nested blocksize 256: packed 4-bit weights + uint8 absmax +
fp32 nested absmax + quant maps + the quant-state JSON per quantized Linear; other
parameters fp16; tied lm_head stored once) plus the safetensors header. In the full
run the formula is cross-checked against a real bitsandbytes quantization and
``save_pretrained`` of the tiny model (``nf4_real_bytes``).

Usage::

    python benchmarks/bench_bundle.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_bundle.py --quick    # CI: tiny only, fewer steps (< 60 s)
    python benchmarks/bench_bundle.py --out runs/bench_bundle.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from delta_packager import (
    AdapterConfig,
    PackagePolicy,
    PackagerState,
    apply_bundle,
    package_version,
    parse_bundle,
)

FP = "sha256:" + "0" * 64
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Projection name -> (in_features, out_features)."""
        kv = self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (self.hidden, self.hidden),
            "self_attn.k_proj": (self.hidden, kv),
            "self_attn.v_proj": (self.hidden, kv),
            "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.hidden, self.intermediate),
            "mlp.up_proj": (self.hidden, self.intermediate),
            "mlp.down_proj": (self.intermediate, self.hidden),
        }


TINY = Shape("tiny", 2048, 192, 4, 6, 2, 512, tied=False, qkv_bias=False)
QWEN = Shape("qwen0.5b", 151936, 896, 24, 14, 2, 4864, tied=True, qkv_bias=True)


# ------------------------------------------------------------------ sizes


def nf4_bytes(shape: Shape, *, quant_state_json: int = 170) -> int:
    """Bytes of a bitsandbytes NF4 + double-quant checkpoint of ``shape`` (see module doc)."""
    total, entries = 0, 0
    for _ in range(shape.layers):
        for fin, fout in shape.linears().values():
            n = fin * fout
            blocks = math.ceil(n / 64)
            total += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 1024 + 64
            total += quant_state_json
            entries += 6
        total += 2 * 2 * shape.hidden  # two RMSNorm weights, fp16
        entries += 2
        if shape.qkv_bias:
            total += 2 * (shape.hidden + 2 * shape.kv_heads * shape.head_dim)
            entries += 3
    total += 2 * shape.vocab * shape.hidden * (1 if shape.tied else 2) + 2 * shape.hidden
    entries += 2 if shape.tied else 3
    return total + 8 + entries * 160  # safetensors header: ~160 bytes per entry


def lora_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """PEFT ``save_pretrained`` names and shapes of r=8 LoRA on all projections."""
    out = {}
    for i in range(shape.layers):
        for proj, (fin, fout) in shape.linears().items():
            prefix = f"base_model.model.model.layers.{i}.{proj}"
            out[f"{prefix}.lora_A.weight"] = (RANK, fin)
            out[f"{prefix}.lora_B.weight"] = (fout, RANK)
    return out


def peft_file_bytes(tensors: dict[str, np.ndarray], dtype: type) -> int:
    """Size of the adapter_model.safetensors PEFT writes for these tensors."""
    import safetensors.numpy

    cast: dict[str, np.ndarray] = {k: v.astype(dtype) for k, v in tensors.items()}
    return len(safetensors.numpy.save(cast, metadata={"format": "pt"}))


# ------------------------------------------------------------------ packaging


def adapter_config() -> AdapterConfig:
    return AdapterConfig(rank=RANK, alpha=float(ALPHA), target_modules=MODULES)


def timed(fn: Any, repeat: int) -> tuple[Any, float, float]:
    """Run ``fn`` ``repeat`` times; return its last result, median wall and CPU seconds.

    CPU time is reported beside wall time because the benchmark box is shared: wall
    time includes waiting for a core, CPU time is the work the apply itself does.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return result, statistics.median(walls), statistics.median(cpus)


def package_pair(
    v1: dict[str, np.ndarray], v2: dict[str, np.ndarray], *, repeat: int
) -> dict[str, Any]:
    """Package v1 (full) then v2 (delta); time packaging and device-side parse+apply."""
    cfg = adapter_config()
    first = package_version(v1, previous=None, base_fingerprint=FP, adapter_config=cfg)
    full_v2 = package_version(v2, previous=None, base_fingerprint=FP, adapter_config=cfg)
    delta, pack_s, _ = timed(
        lambda: package_version(v2, previous=first.state, base_fingerprint=FP, adapter_config=cfg),
        repeat,
    )
    device_v1 = first.state.current

    def apply_delta() -> Any:
        return apply_bundle(device_v1, parse_bundle(delta.bundle_bytes), base_fingerprint=FP)

    def apply_full() -> Any:
        return apply_bundle(None, parse_bundle(full_v2.bundle_bytes), base_fingerprint=FP)

    applied, apply_delta_s, apply_delta_cpu_s = timed(apply_delta, repeat)
    _, apply_full_s, apply_full_cpu_s = timed(apply_full, repeat)
    exact = all(
        applied.tensors[k].tobytes() == delta.state.current.tensors[k].tobytes() for k in v2
    )
    return {
        "full_bundle_bytes": len(full_v2.bundle_bytes),
        "delta_bundle_bytes": len(delta.bundle_bytes),
        "package_delta_s": pack_s,
        "apply_delta_s": apply_delta_s,
        "apply_full_s": apply_full_s,
        "apply_delta_cpu_s": apply_delta_cpu_s,
        "apply_full_cpu_s": apply_full_cpu_s,
        "delta_apply_bit_exact": exact,
        "_delta_state": delta.state,
        "_full_state": full_v2.state,
    }


def chain_check(v: dict[str, np.ndarray], stats: dict[str, float], rounds: int, seed: int) -> bool:
    """``rounds`` chained int8 deltas: device state == packager reconstruction, bit for bit."""
    rng = np.random.default_rng(seed)
    cfg, policy = adapter_config(), PackagePolicy(chain_limit=rounds)
    state: PackagerState | None = None
    device = None
    for _ in range(rounds + 1):
        result = package_version(
            v, previous=state, base_fingerprint=FP, adapter_config=cfg, policy=policy
        )
        state = result.state
        device = apply_bundle(device, parse_bundle(result.bundle_bytes), base_fingerprint=FP)
        if any(device.tensors[k].tobytes() != state.current.tensors[k].tobytes() for k in v):
            return False
        v = step(v, stats, rng)
    assert state is not None and len(state.chain) == rounds + 1
    return True


def step(
    v: dict[str, np.ndarray], stats: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One simulated round: Gaussian updates with the measured per-element RMS."""
    out = {}
    for k, a in v.items():
        sigma = stats["rms_dA"] if ".lora_A." in k else stats["rms_dB"]
        out[k] = (a + sigma * rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float32)
    return out


# ------------------------------------------------------------------ tiny: real training


def tiny_round(
    *, local_steps: int, rounds: int, eval_batches: int, batch_size: int, seq_len: int
) -> dict[str, Any]:
    """Train LoRA on the tiny shape for ``rounds`` FedAvg rounds; measure the last one."""
    import torch
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the box is shared; one thread is the honest setting
    s = TINY
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(MODULES), lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(1)

    def batch(client: int, n: int = batch_size, seq: int = seq_len) -> torch.Tensor:
        # Each client's sequences follow its own arithmetic progressions (non-IID).
        start = torch.randint(0, s.vocab, (n, 1), generator=gen)
        stride = (client * 7 + torch.randint(1, 5, (n, 1), generator=gen)) % 64 + 1
        return (start + stride * torch.arange(seq)) % s.vocab

    def global_state() -> dict[str, np.ndarray]:
        sd = get_peft_model_state_dict(model)
        return {k: v.detach().float().numpy().copy() for k, v in sd.items()}

    def load(state: dict[str, np.ndarray]) -> None:
        set_peft_model_state_dict(
            model, {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
        )

    def fed_round(start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for client in range(3):
            load(start)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            model.train()
            for _ in range(local_steps):
                x = batch(client)
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            results.append(global_state())
        return {k: np.mean([r[k] for r in results], axis=0).astype(np.float32) for k in start}

    states = [global_state()]
    for _ in range(rounds):
        states.append(fed_round(states[-1]))
    v1, v2 = states[-2], states[-1]
    eval_x = [batch(c % 3) for c in range(eval_batches)]

    def eval_loss(state: dict[str, np.ndarray]) -> float:
        load(state)
        model.eval()
        with torch.no_grad():
            return float(np.mean([model(input_ids=x, labels=x).loss.item() for x in eval_x]))

    with tempfile.TemporaryDirectory() as tmp:
        load(v2)
        model.save_pretrained(f"{tmp}/fp32")
        peft_fp32 = Path(f"{tmp}/fp32/adapter_model.safetensors").stat().st_size
    stats = {
        "rms_A": rms([v for k, v in v2.items() if ".lora_A." in k]),
        "rms_B": rms([v for k, v in v2.items() if ".lora_B." in k]),
        "rms_dA": rms([v2[k] - v1[k] for k in v2 if ".lora_A." in k]),
        "rms_dB": rms([v2[k] - v1[k] for k in v2 if ".lora_B." in k]),
    }
    return {
        "v1": v1,
        "v2": v2,
        "stats": stats,
        "eval_loss": eval_loss,
        "peft_fp32_real": peft_fp32,
        "loss_rounds": [eval_loss(st) for st in (states[0], v2)],
    }


def rms(arrays: list[np.ndarray]) -> float:
    total = sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)
    return math.sqrt(total / sum(a.size for a in arrays))


def nf4_real_bytes() -> int:
    """Real bitsandbytes NF4 + double-quant ``save_pretrained`` of the tiny shape."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    s = TINY
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_fp = LlamaForCausalLM(config)
        model_fp.half()
        model_fp.save_pretrained(f"{tmp}/fp")
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = LlamaForCausalLM.from_pretrained(
            f"{tmp}/fp", quantization_config=q, device_map="cpu"
        )
        model.save_pretrained(f"{tmp}/nf4")
        return sum(p.stat().st_size for p in Path(f"{tmp}/nf4").glob("*.safetensors"))


# ------------------------------------------------------------------ the two rows


def tiny_row(quick: bool) -> tuple[dict[str, Any], dict[str, float]]:
    trained = tiny_round(
        local_steps=2 if quick else 10,
        rounds=2 if quick else 5,
        eval_batches=1 if quick else 6,
        batch_size=4 if quick else 8,
        seq_len=32 if quick else 64,
    )
    v1, v2 = trained["v1"], trained["v2"]
    row = package_pair(v1, v2, repeat=3)
    float_loss = trained["eval_loss"](v2)
    delta_loss = trained["eval_loss"](dict(row.pop("_delta_state").current.tensors))
    full_loss = trained["eval_loss"](dict(row.pop("_full_state").current.tensors))
    row.update(
        model="tiny",
        nf4_base_bytes=nf4_bytes(TINY),
        peft_fp32_bytes=peft_file_bytes(v2, np.float32),
        peft_fp16_bytes=peft_file_bytes(v2, np.float16),
        peft_fp32_save_pretrained_bytes=trained["peft_fp32_real"],
        eval_loss_float=float_loss,
        eval_loss_device_delta=delta_loss,
        eval_loss_device_full=full_loss,
        eval_loss_rel_change_delta=abs(delta_loss - float_loss) / float_loss,
        eval_loss_rel_change_full=abs(full_loss - float_loss) / float_loss,
        eval_loss_no_adapter=trained["loss_rounds"][0],
        adapter_effect_rel=(trained["loss_rounds"][0] - float_loss) / float_loss,
        int8_change_over_adapter_effect=abs(delta_loss - float_loss)
        / max(abs(trained["loss_rounds"][0] - float_loss), 1e-12),
        chain20_bit_exact=chain_check(v2, trained["stats"], 20, seed=5),
        update_stats=trained["stats"],
    )
    if not quick:
        row["nf4_real_bytes"] = nf4_real_bytes()
    return row, trained["stats"]


def qwen_row(stats: dict[str, float], *, chain: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    v1 = {}
    for name, (a, b) in lora_shapes(QWEN).items():
        if ".lora_A." in name:
            bound = 1 / math.sqrt(b)  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in)
            v1[name] = rng.uniform(-bound, bound, (a, b)).astype(np.float32)
        else:
            v1[name] = (stats["rms_B"] * rng.standard_normal((a, b), dtype=np.float32)).astype(
                np.float32
            )
    v2 = step(v1, stats, rng)
    row = package_pair(v1, v2, repeat=7)
    row.pop("_delta_state"), row.pop("_full_state")
    ffa = {k: (v1[k] if ".lora_A." in k else v) for k, v in v2.items()}
    row.update(
        model="qwen0.5b",
        nf4_base_bytes=nf4_bytes(QWEN),
        peft_fp32_bytes=peft_file_bytes(v2, np.float32),
        peft_fp16_bytes=peft_file_bytes(v2, np.float16),
        delta_bundle_ffa_bytes=package_pair(v1, ffa, repeat=1)["delta_bundle_bytes"],
        lora_params=sum(v.size for v in v2.values()),
    )
    if chain:
        row["chain20_bit_exact"] = chain_check(v2, stats, 20, seed=6)
    return row


# ------------------------------------------------------------------ report


TARGETS = {
    "full <= 1% of NF4 base (0.5B)": lambda r: r["full_bundle_bytes"] <= 0.01 * r["nf4_base_bytes"],
    "delta <= 0.5x fp16 adapter": lambda r: r["delta_bundle_bytes"] <= 0.5 * r["peft_fp16_bytes"],
    "apply < 100 ms (0.5B)": lambda r: r["apply_delta_s"] < 0.1 and r["apply_full_s"] < 0.1,
}


def report(rows: list[dict[str, Any]]) -> str:
    def mb(x: float) -> str:
        return f"{x / 1e6:10.3f} MB"

    lines = [f"{'':34}" + "".join(f"{r['model']:>16}" for r in rows)]

    def ms(x: float) -> str:
        return f"{1e3 * x:10.1f} ms"

    def pct(x: float) -> str:
        return f"{100 * x:11.4f} %"

    fields = [
        ("NF4 base checkpoint", "nf4_base_bytes", mb),
        ("PEFT adapter fp32", "peft_fp32_bytes", mb),
        ("PEFT adapter fp16", "peft_fp16_bytes", mb),
        ("fedota full bundle (int8)", "full_bundle_bytes", mb),
        ("fedota delta bundle (int8)", "delta_bundle_bytes", mb),
        ("fedota delta bundle, FFA (B only)", "delta_bundle_ffa_bytes", mb),
        ("full / NF4 base", "full_over_base", lambda x: f"{100 * x:11.3f} %"),
        ("delta / fp16 adapter", "delta_over_fp16", lambda x: f"{x:12.3f} x"),
        ("package delta", "package_delta_s", ms),
        ("apply delta (parse + apply)", "apply_delta_s", ms),
        ("apply full (parse + apply)", "apply_full_s", ms),
        ("apply delta, CPU time", "apply_delta_cpu_s", ms),
        ("apply full, CPU time", "apply_full_cpu_s", ms),
        ("eval loss change, int8 delta", "eval_loss_rel_change_delta", pct),
        ("eval loss change, int8 full", "eval_loss_rel_change_full", pct),
        ("adapter's own effect on eval loss", "adapter_effect_rel", pct),
        ("20 chained deltas bit-exact", "chain20_bit_exact", lambda x: f"{x!s:>13}"),
    ]
    for row in rows:
        row["full_over_base"] = row["full_bundle_bytes"] / row["nf4_base_bytes"]
        row["delta_over_fp16"] = row["delta_bundle_bytes"] / row["peft_fp16_bytes"]
    for label, key, fmt in fields:
        cells = "".join(f"{fmt(r[key]):>16}" if key in r else f"{'-':>16}" for r in rows)
        lines.append(f"{label:34}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer steps (CI)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_bundle.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    tiny, stats = tiny_row(args.quick)
    rows = [tiny]
    if not args.quick:
        rows.append(qwen_row(stats, chain=True))
    print(report(rows))
    checks: dict[str, bool] = {}
    target_row = rows[-1]
    for name, check in TARGETS.items():
        if "0.5B" in name and target_row["model"] != "qwen0.5b":
            continue
        checks[name] = bool(check(target_row))
    checks["int8 eval loss change < 0.1% (tiny)"] = tiny["eval_loss_rel_change_delta"] < 1e-3
    checks["20 chained deltas bit-exact"] = all(r.get("chain20_bit_exact", True) for r in rows)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if "nf4_real_bytes" in tiny:
        print(
            f"NF4 formula check (tiny): formula {tiny['nf4_base_bytes']} B, "
            f"real {tiny['nf4_real_bytes']} B"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "rows": rows,
                "targets": checks,
                "seconds": time.perf_counter() - t0,
            },
            indent=2,
            sort_keys=True,
        )
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
