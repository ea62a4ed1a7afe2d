"""Record-level DP utility: the variants tried for issue 3's target, side by side.

An in-process replica of ``bench_federated.py``'s record-level DP row, without Ray, so a
variant takes 2-10 minutes on one core: the default synthetic data (6 clients), the
tiny base, 3 clients per round (seeded), 3 rounds, ``ffa`` averaged weighted by
examples, DP-SGD at ε = 8 per phone, and every round evaluated on the training
clients' held-out text in 64-token blocks (the benchmark's evaluation). Clients are
sampled balanced (fewest rounds so far first) or uniformly, each round alone; the
random draws differ from the Flower ``ServerApp``'s, so absolute numbers differ
slightly from ``bench_federated.py``; compare variants with each other.

``default`` is ``fedota simulate``'s record-DP default: balanced sampling, each phone
planning its ε over the rounds it is scheduled in, 8 steps each on every text of the
phone (q = 1), LoRA on every linear projection and the output head. Variants marked
"uniform" change one thing from the default before balanced sampling (``uniform``:
each round drawn alone, every phone planning for every round, 5 steps); "no head"
ones from the default before the head was adapted (``no-head``); most others from the
default before that, 10 steps of 128 texts (``batch-128``). ``fed-no-dp`` is the
benchmark's non-private row before balanced sampling, ``fed-no-dp-balanced`` the row
now (the gain the DP row is compared with); ``fed-no-dp-head`` adds the head.

Experiments patched in here, not product settings: the ``principal-a`` variants freeze
FFA's A at the top-r right singular vectors of each dequantized base weight, the
``activation-a`` ones at the principal directions of each module's input on public
text (DESIGN decision 3 fixes A at a seeded init); the ``project`` ones project each
noisy gradient (after Opacus adds the noise, so ε is unchanged) on the top-k right
singular vectors of per-text gradients on public text; ``snr-weights`` weights the
average by examples / σ.

Usage::

    python benchmarks/explore_record_dp.py                      # every variant (~2 h)
    python benchmarks/explore_record_dp.py --only default batch-128 --seed 1
    python benchmarks/explore_record_dp.py --list
    python benchmarks/explore_record_dp.py --coherence          # per-module, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from simulation import FederatedConfig

CLIENTS, PER_ROUND, SEED = 6, 3, 0

# Every variant starts from DEFAULTS (fedota simulate's record-DP default, read from
# simulate itself) and changes the keys it names. UNIFORM is the default before
# balanced sampling (each round drawn alone, every phone planning for every round, 5
# steps); NO_HEAD is the one before the output head was adapted, which the variants
# marked "no head" were measured against; OLD is the one before that (batch-128),
# which most other variants change.
_SIMULATE = FederatedConfig(out_dir=Path("unused"), dp_mode="record").client_hyperparameters()
DEFAULTS: dict[str, Any] = {
    "rank": _SIMULATE["lora-rank"], "lr": _SIMULATE["learning-rate"],
    "steps": _SIMULATE["local-steps"], "batch": _SIMULATE["batch-size"],
    "seq_len": _SIMULATE["seq-len"], "head": _SIMULATE["lora-head"], "rounds": 3,
    "epsilon": 8.0, "ffa": True, "dp": True, "per_round": PER_ROUND, "min_texts": 500,
    "target_modules": None, "principal_a": False, "activation_a": None, "clip": 1.0,
    "sampling": "balanced", "plan": "scheduled", "snr_weights": False, "projection": None,
    "public_texts": 600, "seed": SEED,
}  # fmt: skip
UNIFORM: dict[str, Any] = {"sampling": "uniform", "plan": "every-round", "steps": 5}
NO_HEAD: dict[str, Any] = {**UNIFORM, "head": False}
OLD: dict[str, Any] = {**NO_HEAD, "steps": 10, "batch": 128}
NO_DP_ROW: dict[str, Any] = {**NO_HEAD, "ffa": False, "dp": False, "lr": 5e-3, "batch": 8,
                             "seq_len": 64, "steps": 10}  # fmt: skip
# PEFT matches a target name against the end of a module's path: "layers.0.mlp.up_proj"
# adapts that one layer's projection.
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("balanced sampling, each phone's epsilon over its scheduled rounds, 8 steps "
                "on every text (q = 1), rank 8, lr 0.03, LoRA on every linear projection "
                "and the output head: fedota simulate's default", {}),
    "balanced-steps-5": ("the default with 5 steps", {"steps": 5}),
    "balanced-steps-12": ("the default with 12 steps", {"steps": 12}),
    "first-layer": ("the default with LoRA on the first layer's projections and the head only",
                    {"target_modules": tuple(f"layers.0.{m}" for m in _PROJECTIONS)}),
    "first-two-layers": ("the default with LoRA on the first two layers' projections and the "
                         "head only",
                         {"target_modules": tuple(f"layers.{i}.{m}" for i in (0, 1)
                                                  for m in _PROJECTIONS)}),
    "snr-weights": ("the default, updates weighted by examples / sigma",
                    {"snr_weights": True}),
    "lr-0.04": ("the default at lr 0.04", {"lr": 4e-2}),
    "lr-0.02": ("the default at lr 0.02", {"lr": 2e-2}),
    "uniform": ("each round's clients drawn alone, every phone planning epsilon over every "
                "round, 5 steps: the previous default", UNIFORM),
    "exact-participation": ("uniform, each phone planning over the rounds it is drawn in",
                            {**UNIFORM, "plan": "scheduled"}),
    "no-head": ("uniform without LoRA on the output head: the default before", NO_HEAD),
    "head-lr-0.015": ("uniform at lr 0.015", {**UNIFORM, "lr": 1.5e-2}),
    "head-only": ("uniform with LoRA on the output head only",
                  {**NO_HEAD, "target_modules": ("lm_head",)}),
    "rank-32": ("uniform, rank 32, lr 0.015 (4x the upload)",
                {**UNIFORM, "rank": 32, "lr": 1.5e-2}),
    "rank-64": ("uniform, rank 64, lr 0.01 (8x the upload)", {**UNIFORM, "rank": 64, "lr": 1e-2}),
    "rank-32-no-head": ("no head, rank 32, lr 0.015", {**NO_HEAD, "rank": 32, "lr": 1.5e-2}),
    "rank-64-no-head": ("no head, rank 64, lr 0.01", {**NO_HEAD, "rank": 64, "lr": 1e-2}),
    "epsilon-32": ("no head, epsilon = 32 instead of 8", {**NO_HEAD, "epsilon": 32.0}),
    "no-dp-full-batch": ("no head, without DP (no clipping, no noise, packed blocks)",
                         {**NO_HEAD, "dp": False}),
    "batch-128": ("10 steps of 128 texts (q ~ 1/5), no head: the default before that", OLD),
    "batch-256": ("no head, 5 steps of 256 texts (q ~ 1/3)", {**NO_HEAD, "batch": 256}),
    "full-batch-3": ("no head, 3 steps on every text", {**NO_HEAD, "steps": 3}),
    "full-batch-10": ("no head, 10 steps on every text", {**NO_HEAD, "steps": 10}),
    "full-batch-lr-0.06": ("no head, lr 0.06", {**NO_HEAD, "lr": 6e-2}),
    "full-batch-lr-0.015": ("no head, lr 0.015", {**NO_HEAD, "lr": 1.5e-2}),
    "earlier-default": ("batch-128 at rank 4, lr 0.06", {**OLD, "rank": 4, "lr": 6e-2}),
    "rank-1": ("batch-128 at rank 1", {**OLD, "rank": 1}),
    "rank-16": ("batch-128 at rank 16, lr 0.015", {**OLD, "rank": 16, "lr": 1.5e-2}),
    "out-proj-only": ("batch-128 with LoRA on o_proj and down_proj only",
                      {**OLD, "target_modules": ("o_proj", "down_proj")}),
    "v-proj-only": ("no head, LoRA on v_proj only (1/27 of the trainable parameters)",
                    {**NO_HEAD, "target_modules": ("v_proj",)}),
    "k-v-proj": ("no head, LoRA on k_proj and v_proj",
                 {**NO_HEAD, "target_modules": ("k_proj", "v_proj")}),
    "v-o-proj": ("no head, LoRA on v_proj and o_proj",
                 {**NO_HEAD, "target_modules": ("v_proj", "o_proj")}),
    "attention-only": ("no head, LoRA on q, k, v and o projections",
                       {**NO_HEAD, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}),
    "fedavg": ("batch-128 with fedavg instead of ffa, lr 0.01",
               {**OLD, "ffa": False, "lr": 1e-2}),
    "all-clients": ("batch-128 with all 6 clients in every round", {**OLD, "per_round": CLIENTS}),
    "more-rounds": ("batch-128 for 8 rounds", {**OLD, "rounds": 8}),
    "participation": ("batch-128 with epsilon planned over 2 rounds (a phone trains in 1.5)",
                      {**OLD, "plan": 2}),
    "clip-0.1": ("batch-128 with clipping bound C = 0.1", {**OLD, "clip": 0.1}),
    "principal-a": ("batch-128 with FFA A = top-r right singular vectors of the base "
                    "weight, lr 0.01", {**OLD, "principal_a": True, "lr": 1e-2}),
    "principal-a-full-batch": ("no head, the principal A, lr 0.01",
                               {**NO_HEAD, "principal_a": True, "lr": 1e-2}),
    "principal-a-full-batch-lr-0.03": ("no head, the principal A",
                                       {**NO_HEAD, "principal_a": True}),
    "more-data": ("4x the texts per phone (at least 2,000), 10 steps of 512 texts (q ~ 1/5), "
                  "no head", {**NO_HEAD, "min_texts": 2000, "steps": 10, "batch": 512}),
    "more-data-full-batch": ("no head, 4x the texts per phone, 5 steps on every text",
                             {**NO_HEAD, "min_texts": 2000}),
    "no-noise": ("batch-128 without DP (clipping and noise off)", {**OLD, "dp": False}),
    "fed-no-dp": ("no DP, fedavg, lr 5e-3, 10 steps of 8 64-token blocks: the benchmark's "
                  "non-private row", NO_DP_ROW),
    "fed-no-dp-head": ("fed-no-dp with LoRA on the output head too",
                       {**NO_DP_ROW, "head": True}),
    "fed-no-dp-more-data": ("fed-no-dp on 4x the texts per phone",
                            {**NO_DP_ROW, "min_texts": 2000}),
    "seeded-a-no-noise": ("fed-no-dp with ffa", {**NO_DP_ROW, "ffa": True}),
    "principal-a-no-noise": ("fed-no-dp with ffa and the principal A",
                             {**NO_DP_ROW, "ffa": True, "principal_a": True}),
    "fed-no-dp-balanced": ("fed-no-dp with balanced sampling: the benchmark's row now",
                           {**NO_DP_ROW, "sampling": "balanced"}),
    "activation-a": ("uniform, A = top-r principal directions of each module's input on "
                     "public text", {**UNIFORM, "activation_a": "top"}),
    "activation-a-lr-0.01": ("activation-a at lr 0.01",
                             {**UNIFORM, "activation_a": "top", "lr": 1e-2}),
    "activation-a-lr-0.003": ("activation-a at lr 0.003",
                              {**UNIFORM, "activation_a": "top", "lr": 3e-3}),
    "activation-sub-a": ("uniform, A = a seeded random basis of the top-4r input subspace, "
                         "lr 0.01", {**UNIFORM, "activation_a": "subspace", "lr": 1e-2}),
    "project-64": ("uniform, noisy gradients projected on the top-64 public gradient subspace",
                   {**UNIFORM, "projection": 64}),
    "project-64-lr-0.003": ("project-64 at lr 0.003", {**UNIFORM, "projection": 64, "lr": 3e-3}),
    "project-64-lr-0.001": ("project-64 at lr 0.001", {**UNIFORM, "projection": 64, "lr": 1e-3}),
}  # fmt: skip


def activation_a(trainer: Any, seed: int, mode: str) -> None:
    """Replace the shared A init by the top principal directions of each module's input.

    The inputs are the base model's activations on public text (no private data), so
    every party can rebuild A. Rows keep the seeded init's norm (1/sqrt(3)).
    """
    from client.train import pack_texts
    from simulation.data import generate_public_texts

    modules = dict(trainer.model.named_modules())
    init = trainer.slots._init
    names = [n for n in init if ".lora_A." in n]
    second: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        layer = modules[name.split(".lora_A.")[0]]

        def hook(_m: Any, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            second[name] = second.get(name, 0) + x.T @ x

        hooks.append(layer.register_forward_pre_hook(hook))
    texts = list(generate_public_texts(512, seed + 99991))
    blocks = pack_texts(trainer.tokenizer, texts, 64, pack=True)
    trainer.slots.load(None)
    with torch.no_grad():
        for i in range(0, len(blocks), 32):
            sl = slice(i, i + 32)
            trainer.model(input_ids=blocks.input_ids[sl], attention_mask=blocks.attention_mask[sl])
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        rank = init[name].shape[0]
        _, vecs = torch.linalg.eigh(second[name].double())
        if mode == "top":
            a = vecs[:, -rank:].flip(1).T
        else:  # a seeded random basis of the top-4r subspace
            sub = vecs[:, -4 * rank :]
            q, _ = torch.linalg.qr(torch.randn(sub.shape[1], rank, generator=gen).double())
            a = (sub @ q).T
        init[name] = (a / 3**0.5).to(init[name].dtype).contiguous()


def per_text_gradients(
    trainer: Any, texts: list[str], params: list[torch.nn.Parameter]
) -> Iterator[int]:
    """Back-propagate each text alone (one block each, as DP-SGD sees them).

    Yields the text's index while ``p.grad`` of every parameter holds that text's
    gradient; the model is in train mode meanwhile and the grads are cleared after.
    """
    from client.train import pack_texts
    from client.train._loops import per_sample_loss

    blocks = pack_texts(trainer.tokenizer, texts, DEFAULTS["seq_len"], pack=False).trimmed()
    trainer.model.train()
    for i in range(len(blocks)):
        for p in params:
            p.grad = None
        sl = slice(i, i + 1)
        per_sample_loss(
            trainer.model, blocks.input_ids[sl], blocks.attention_mask[sl], blocks.labels[sl]
        ).sum().backward()
        yield i
    for p in params:
        p.grad = None
    trainer.model.eval()


class PublicSubspace:
    """Top-k right singular vectors of per-text gradients on public text (post-processing)."""

    basis: torch.Tensor | None = None

    @classmethod
    def fit(cls, trainer: Any, adapter: Any, texts: list[str], k: int) -> None:
        trainer.slots.load(adapter)
        params = [trainer.slots.params[n] for n in trainer.slots.exchanged]
        rows = []
        for _ in per_text_gradients(trainer, texts, params):
            g = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
            rows.append(g / g.norm().clamp(min=1e-12))
        _, _, vh = torch.linalg.svd(torch.stack(rows), full_matrices=False)
        cls.basis = vh[:k].contiguous()

    @classmethod
    def install(cls) -> None:
        from opacus.optimizers.optimizer import DPOptimizer

        original = DPOptimizer.scale_grad

        def scale_then_project(self: Any) -> None:
            original(self)
            if cls.basis is None:
                return
            ps = [p for p in self.params if p.grad is not None]
            g = torch.cat([p.grad.flatten() for p in ps])
            g = cls.basis.T @ (cls.basis @ g)
            i = 0
            for p in ps:
                p.grad.copy_(g[i : i + p.numel()].view_as(p))
                i += p.numel()

        DPOptimizer.scale_grad = scale_then_project  # type: ignore[method-assign]


def principal_a(trainer: Any) -> None:
    """Replace the trainer's shared A init by each base weight's top right singular vectors."""
    import bitsandbytes.functional as bnbf

    modules = dict(trainer.model.named_modules())
    init = trainer.slots._init
    for name in [n for n in init if ".lora_A." in n]:
        weight = modules[name.split(".lora_A.")[0]].base_layer.weight
        state = getattr(weight, "quant_state", None)
        dense = bnbf.dequantize_4bit(weight.data, state) if state is not None else weight.data
        _, _, vh = torch.linalg.svd(dense.float(), full_matrices=False)
        rank = init[name].shape[0]
        a = vh[:rank].clone()
        a *= torch.sign(a[torch.arange(rank), a.abs().argmax(dim=1)])[:, None]  # fix signs
        init[name] = a.to(init[name].dtype)


def run_variant(base: Path, cfg: dict[str, Any]) -> list[dict[str, float]]:
    """Accuracy and loss after each round (round 0 = the base) of one variant."""
    from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings
    from simulation.data import SyntheticConfig, generate_synthetic

    data = generate_synthetic(
        SyntheticConfig(
            num_clients=CLIENTS, num_heldout_clients=2, seed=cfg["seed"], min_texts=cfg["min_texts"]
        )
    )
    lora = LoraSettings(
        rank=cfg["rank"], alpha=2.0 * cfg["rank"], ffa=cfg["ffa"], init_seed=cfg["seed"],
        target_modules=cfg["target_modules"], adapt_head=cfg["head"],
    )  # fmt: skip
    trainer = LocalTrainer(base, lora)
    if cfg["principal_a"]:
        principal_a(trainer)
    if cfg["activation_a"]:
        activation_a(trainer, cfg["seed"], cfg["activation_a"])

    def evaluate(adapter: Any) -> dict[str, float]:
        loss = acc = tokens = 0.0
        for c in data.clients:
            r = trainer.evaluate(adapter, list(c.heldout)[:150])
            loss, acc, tokens = (
                loss + r.loss * r.num_tokens, acc + r.accuracy * r.num_tokens, tokens + r.num_tokens
            )  # fmt: skip
        return {"accuracy": acc / tokens, "loss": loss / tokens}

    history = [evaluate(None)]
    rng = random.Random(cfg["seed"])
    adapter: dict[str, torch.Tensor] | None = None
    dp = (
        DPSettings(enabled=True, target_epsilon=cfg["epsilon"], max_grad_norm=cfg["clip"])
        if cfg["dp"]
        else DPSettings()
    )
    schedule = [sorted(rng.sample(range(CLIENTS), cfg["per_round"])) for _ in range(cfg["rounds"])]
    if cfg["sampling"] == "balanced":  # fewest rounds so far first, seeded ties
        counts = [0] * CLIENTS
        for rnd in range(cfg["rounds"]):
            order = sorted(range(CLIENTS), key=lambda c: (counts[c], rng.random()))
            schedule[rnd] = sorted(order[: cfg["per_round"]])
            for c in schedule[rnd]:
                counts[c] += 1
    times = [sum(i in chosen for chosen in schedule) for i in range(CLIENTS)]
    logging.info("schedule %s, rounds per phone %s", schedule, times)
    if cfg["projection"]:
        from simulation.data import generate_public_texts

        public = list(generate_public_texts(cfg["public_texts"], cfg["seed"] + 12345))
        PublicSubspace.install()
    for rnd in range(cfg["rounds"]):
        updates = []
        if cfg["projection"]:
            PublicSubspace.fit(trainer, adapter, public, cfg["projection"])
        for i in schedule[rnd]:
            plan = cfg["plan"]  # "scheduled", "every-round" or a number of rounds
            planned = {"scheduled": times[i], "every-round": cfg["rounds"]}.get(plan, plan)
            settings = TrainSettings(
                local_steps=cfg["steps"], learning_rate=cfg["lr"], batch_size=cfg["batch"],
                seq_len=cfg["seq_len"], seed=rnd * 1000 + i, planned_rounds=planned,
            )  # fmt: skip
            result = trainer.train(adapter, list(data.clients[i].train), settings, dp)
            weight = result.num_examples
            if cfg["snr_weights"] and result.noise_multiplier:
                weight /= result.noise_multiplier  # less noise, more weight
            updates.append((weight, result.adapter))
        total = sum(n for n, _ in updates)
        adapter = {
            k: cast(torch.Tensor, sum(n * u[k] for n, u in updates)) / total for k in updates[0][1]
        }
        history.append(evaluate(adapter))
        logging.info("round %d: %s", rnd + 1, history[-1])
    return history


def coherence(base: Path, seed: int) -> dict[str, float]:
    """How much one phone's per-text gradients agree, per adapted module kind.

    ``|sum_i g_i| / sum_i |g_i|`` over the texts of client 0 at the initial adapter
    (the first DP-SGD step's gradients before clipping; 1 = every text pulls the same
    way). DP-SGD's signal against its noise grows with it.
    """
    from client.train import LocalTrainer, LoraSettings
    from simulation.data import SyntheticConfig, generate_synthetic

    data = generate_synthetic(
        SyntheticConfig(num_clients=CLIENTS, num_heldout_clients=2, seed=seed, min_texts=500)
    )
    lora = LoraSettings(
        rank=DEFAULTS["rank"], alpha=2.0 * DEFAULTS["rank"], ffa=True, init_seed=seed,
        adapt_head=True,
    )  # fmt: skip
    trainer = LocalTrainer(base, lora)
    trainer.slots.load(None)
    params = {n: trainer.slots.params[n] for n in trainer.slots.exchanged}

    def kind(name: str) -> str:
        return name.split(".lora_")[0].rsplit(".", 1)[-1]

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms: dict[str, float] = {}
    for _ in per_text_gradients(trainer, list(data.clients[0].train), list(params.values())):
        squares: dict[str, float] = {}
        for n, p in params.items():
            assert p.grad is not None
            total[n] += p.grad
            squares[kind(n)] = squares.get(kind(n), 0.0) + float((p.grad**2).sum())
        for k, v in squares.items():
            norms[k] = norms.get(k, 0.0) + v**0.5
    summed: dict[str, float] = {}
    for n, t in total.items():
        summed[kind(n)] = summed.get(kind(n), 0.0) + float((t**2).sum())
    return {k: summed[k] ** 0.5 / norms[k] for k in sorted(norms, key=lambda k: -summed[k])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument(
        "--coherence", action="store_true", help="per-module agreement of per-text gradients"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="seed of data, init, sampling")
    parser.add_argument("--base-model", default=None, help="base model directory")
    parser.add_argument("--out", default="runs/explore_record_dp.json")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, _) in VARIANTS.items():
            print(f"{name:<22}{what}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    from simulation import ensure_base_model

    base = Path(args.base_model) if args.base_model else ensure_base_model(
        Path.home() / ".cache" / "fedota", preset="tiny", seed=SEED
    )  # fmt: skip
    if args.coherence:
        for module, value in sorted(coherence(base, args.seed).items(), key=lambda kv: -kv[1]):
            print(f"{module:<12}{value:>7.3f}")
        return 0
    results: dict[str, Any] = {}
    for name in args.only or list(VARIANTS):
        what, changes = VARIANTS[name]
        logging.info("variant %s: %s", name, what)
        t0 = time.monotonic()
        history = run_variant(base, {**DEFAULTS, **changes, "seed": args.seed})
        results[name] = {"what": what, "rounds": history, "wall_s": time.monotonic() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'variant':<22}{'acc r0':>8}{'acc final':>11}{'gain':>8}{'loss final':>12}  what")
    for name, r in results.items():
        first, last = r["rounds"][0], r["rounds"][-1]
        print(
            f"{name:<22}{first['accuracy']:>8.3f}{last['accuracy']:>11.3f}"
            f"{last['accuracy'] - first['accuracy']:>+8.3f}{last['loss']:>12.3f}  {r['what']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
