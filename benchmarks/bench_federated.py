"""Federated utility side by side (issue 3 benchmarks, federation half).

For each seed, one run of every row on the same synthetic data (the generator's
defaults), base model and seed:

* ``base``            the base model, no training (round 0 of every run)
* ``local-only``      each client trains alone for ``rounds × local_steps`` steps
* ``fed-no-dp``       federated, ``fedavg``, no DP (``fedota simulate --no-dp`` defaults)
* ``fed-no-dp-head``  ``fed-no-dp`` with LoRA on the output head too (the record-DP
                      default adapts it; its gain is kept against both rows)
* ``fed-record-dp``   federated, ``ffa``, record-level DP-SGD on each phone, ε = 8 per
                      phone, ``fedota simulate``'s defaults plus any overrides in
                      ``Plan.record_dp`` (the settings used are printed); clients
                      are sampled balanced (fewest rounds first) and each phone
                      spreads its ε over the rounds it is scheduled in
* ``fed-record-dp-uniform``  the same with each round's clients drawn alone (the
                      sampling before; each phone plans its ε over the rounds
                      the seeded draws pick it for)
* ``fed-user-dp-N``   federated, ``ffa``, central user-level DP-FedAvg, ε = 8, for two
                      populations N (100 and 1,000; ``--quick``: 8 and 24) with the SAME
                      number of clients per round, so q = m / N and the calibrated σ
                      fall as N grows at constant cost; own rounds, local steps and
                      rank (printed)
* ``centralized``     one model on the pooled training text, as many steps as the
                      federation ran in total (the non-private upper bound)
* ``fed-no-dp+S``, ``fed-user-dp-N+S``  with ``--strategies S ...``: the same rows with
                      strategy S (``fedavgm``, ``fedadam``, ``fedyogi``: server
                      optimizers, under user-level DP fed the noised update;
                      ``fedprox``: the phones' proximal term), beside the ``fedavg`` ones
* ``pop-N-M-…``       with ``--populations N ...``: user-level DP at population scale
                      (issue 25 item 3), for every population N and cohort M
                      (``--cohorts``, the expected clients per round: q = M / N), all on
                      ``ffa`` with the same rounds and client settings:
                      ``no-dp`` (the non-private reference, M per round), ``user-dp``
                      (today's DP-FedAvg: fedavg, fixed clip) and ``user-dp+S`` for each
                      ``--strategies`` S (adaptive clip at the median, Andrew et al.
                      2021, then S on the noised update); ``no-dp+S``, S without DP
                      (the reference that separates what S gains from what the
                      adaptive clip recovers); ``user-dp+adaptive``, the adaptive clip
                      with plain fedavg. Reported: the share of the ``no-dp`` row's
                      gain each DP row keeps (and of ``no-dp+S``'s for ``user-dp+S``).
                      ``--populations-only`` skips every other row.

Reported for each: loss and next-token accuracy on the training clients' held-out text
and on held-out clients (new users). Also: upload bytes per client per round for
``fedavg`` (fed-no-dp) vs ``ffa`` (per unit of LoRA rank), and the ratios the
issue targets. Every row is evaluated the same way (64-token blocks of the same
held-out text, whatever block length its training used), so each run's round 0 equals
the ``base`` row and gains compare directly. Step-time ratios (DP vs plain, NF4 vs fp32) and peak
memory per client are measured by ``benchmarks/bench_client_train.py``.

Every row is run once per seed (``--seeds``, default 0 to 4): the seed sets the
synthetic data, the base model's pretraining (not with ``--quick`` or
``--base-model``, whose base is shared), the LoRA init and the client sampling. Each
seed's table is printed, then the median over seeds of every row and of every target
ratio, next to each seed's ratio: one seed's ratio moves by a few hundredths with the
draw, so a target is judged on the median and every seed's value is shown beside it.

Federated rows run through ``simulation.federated.run_federated`` — the Ray simulation
engine, exactly as ``fedota simulate``. The others use ``client.train.LocalTrainer``.

Usage::

    python benchmarks/bench_federated.py --quick            # micro base, minutes on 2 cores
    python benchmarks/bench_federated.py                    # tiny base, seeds 0-4 (~1 h)
    python benchmarks/bench_federated.py --seeds 0          # one seed
    python benchmarks/bench_federated.py --base-model DIR --out runs/bench_federated.json
    python benchmarks/bench_federated.py --quick --strategies fedavgm fedadam fedprox
    python benchmarks/bench_federated.py --seeds 0 --populations 1000 --cohorts 50 \
        --populations-only --strategies fedavgm
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench_federated")


@dataclass(frozen=True)
class Plan:
    """What one benchmark run does; every value is printed with the results.

    The user-level DP rows use a fixed number of clients per round for every
    population, so the sampling rate q = m / N falls as N grows and the calibrated σ
    falls with it (the production argument for DP-FedAvg: same cost, more privacy
    amplification). They run their own rounds/local steps/rank, stated in the output.
    """

    clients: int
    heldout_clients: int
    clients_per_round: int
    rounds: int
    local_steps: int
    record_dp: dict[str, Any]  # overrides of simulate's record-level DP client defaults
    user_populations: tuple[int, ...]
    user_clients_per_round: int
    user_rounds: int
    user_dp: dict[str, Any]  # client settings and clip of the user-level DP rows
    eval_max_clients: int


USER_DP = {"local_steps": 3, "lora_rank": 8, "seq_len": 64, "user_clip": 1.0}
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox")


@dataclass(frozen=True)
class PopulationPlan:
    """The population-scale user-level DP rows (``--populations``); printed with them.

    Every row of one (population, cohort) pair shares data, base, rounds and client
    settings; only the privacy and the server's rule differ.
    """

    populations: tuple[int, ...]
    cohorts: tuple[int, ...]
    rounds: int
    strategies: tuple[str, ...]
    client: dict[str, Any]  # FederatedConfig client settings (steps, rank, seq_len)
    clip_quantile: float  # the adaptive rows' target share of unclipped updates
    initial_clip: float
    server: dict[str, dict[str, Any]]  # run-config keys of each strategy's rows
    eval_max_clients: int
    clip_lr: float = 0.2  # η_C of the adaptive clip
    rows: tuple[str, ...] = ()  # run only these rows ("no-dp", "user-dp", a strategy)
    round_timeout_s: float = 600.0  # late replies are dropouts (the run config's default)


# Server optimizer settings of the strategy rows (the run config's defaults otherwise).
STRATEGY_KEYS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"server-momentum": 0.9, "server-learning-rate": 1.0},
    "fedadam": {"server-learning-rate": 0.01},
    "fedyogi": {"server-learning-rate": 0.01},
    "fedprox": {"proximal-mu": 0.01},
}
# 6 per round: user-level DP refuses populations where over 1% of Poisson-sampled
# rounds would train fewer than 2 clients (24 clients at 4 per round: 7%).
QUICK = Plan(4, 2, 2, 2, 4, {"local_steps": 4}, (8, 24), 6, 2, USER_DP, 8)
FULL = Plan(6, 2, 3, 3, 10, {}, (100, 1000), 20, 5, USER_DP, 12)


def _metrics(trainer: Any, adapter: Any, clients: Any, heldout: Any) -> dict[str, float]:
    def pooled(pairs: list[tuple[Any, list[str]]]) -> tuple[float, float]:
        loss = acc = tokens = 0.0
        for ad, texts in pairs:
            if texts:
                r = trainer.evaluate(ad, texts)
                if r.num_tokens:
                    loss += r.loss * r.num_tokens
                    acc += r.accuracy * r.num_tokens
                    tokens += r.num_tokens
        return (loss / tokens, acc / tokens) if tokens else (math.nan, math.nan)

    own = adapter if isinstance(adapter, list) else [adapter] * len(clients)
    c_loss, c_acc = pooled([(own[i], list(c.heldout)) for i, c in enumerate(clients)])
    models = own if isinstance(adapter, list) else [adapter]
    h_loss, h_acc = pooled([(m, [*h.train, *h.heldout]) for m in models for h in heldout])
    return {
        "eval_loss": c_loss,
        "eval_accuracy": c_acc,
        "heldout_clients_loss": h_loss,
        "heldout_clients_accuracy": h_acc,
    }


def trainer_rows(base: Path, plan: Plan, seed: int) -> dict[str, dict[str, Any]]:
    """base, local-only and centralized, with the trainer directly (no federation)."""
    from client.train import DPSettings, LocalTrainer, LoraSettings, TrainSettings
    from simulation.data import SyntheticConfig, generate_synthetic

    data = generate_synthetic(
        SyntheticConfig(
            num_clients=plan.clients, num_heldout_clients=plan.heldout_clients, seed=seed
        )
    )
    trainer = LocalTrainer(base, LoraSettings(rank=8, alpha=16.0, init_seed=seed))
    rows: dict[str, dict[str, Any]] = {}
    rows["base"] = _metrics(trainer, None, data.clients, data.heldout_clients)
    local = []
    for i, c in enumerate(data.clients):
        s = TrainSettings(
            local_steps=plan.rounds * plan.local_steps, seed=seed * 1000 + i, planned_rounds=1
        )
        local.append(trainer.train(None, list(c.train), s, DPSettings()).adapter)
    rows["local-only"] = _metrics(trainer, local, data.clients, data.heldout_clients)
    pooled = [t for c in data.clients for t in c.train]
    steps = plan.rounds * plan.clients_per_round * plan.local_steps
    central = trainer.train(
        None, pooled, TrainSettings(local_steps=steps, seed=seed), DPSettings()
    ).adapter
    rows["centralized"] = _metrics(trainer, central, data.clients, data.heldout_clients)
    return rows


def federated_row(
    name: str, base: Path, out: Path, plan: Plan, seed: int, **kw: Any
) -> dict[str, Any]:
    from simulation import FederatedConfig, run_federated

    cfg = FederatedConfig(
        out_dir=out / name,
        base_model=base,
        seed=seed,
        num_heldout_clients=plan.heldout_clients,
        **{"rounds": plan.rounds, **kw},
    )
    t0 = time.monotonic()
    summary = run_federated(cfg).data.to_dict()
    final, rounds = summary["final"], summary["rounds"]
    trained = [r for r in rounds if r["clients_trained"]]
    last_train = _history(cfg.out_dir)[-1].get("train", {})
    return {
        "strategy": cfg.extra.get("strategy", "fedavg"),
        # under user-level DP: the clip of the last round, and the σ its update sum got
        # (above the accountant's σ when the adaptive clip's count takes its share)
        "last_clip": last_train.get("user-clip"),
        "update_noise_multiplier": last_train.get(
            "user-update-noise-multiplier", last_train.get("user-noise-multiplier")
        ),
        "eval_loss": final["eval_loss"],
        "eval_accuracy": final["eval_accuracy"],
        "heldout_clients_loss": final["heldout_clients"]["eval_loss"],
        "heldout_clients_accuracy": final["heldout_clients"]["eval_accuracy"],
        "baseline_accuracy": summary["baseline"]["eval_accuracy"],
        "epsilon": summary["privacy"]["epsilon"],
        "privacy_mode": summary["privacy"]["mode"],
        "noise_multiplier": summary["privacy"]["noise_multiplier"],
        "clients": summary["config"]["clients"],
        "clients_per_round": cfg.clients_per_round,
        "rounds": cfg.rounds,
        "clients_trained_per_round": [r["clients_trained"] for r in rounds],
        "client_settings": cfg.client_hyperparameters(),
        "aggregation": summary["config"]["aggregation"],
        # over the rounds someone trained in: Poisson sampling (user-level DP) can pick
        # nobody, and an empty round uploads nothing
        "upload_bytes_per_client_per_round": sum(r["upload_bytes_per_client"] for r in trained)
        / max(len(trained), 1),
        "wall_s": round(time.monotonic() - t0, 1),
    }


def _history(out_dir: Path) -> list[dict[str, Any]]:
    from server.federation import load_latest

    ckpt = load_latest(out_dir / "checkpoints")
    return list(ckpt.state["history"]) if ckpt is not None else [{}]


def population_rows(
    pplan: PopulationPlan, base: Path, out: Path, plan: Plan, seed: int
) -> dict[str, dict[str, Any]]:
    """Per population N and cohort M: the non-private reference, today's user-level
    DP-FedAvg, and one adaptive-clip row per strategy; same data, rounds and clients."""
    rows: dict[str, dict[str, Any]] = {}
    for n in pplan.populations:
        for m in pplan.cohorts:
            common: dict[str, Any] = dict(
                aggregation="ffa", num_clients=n, clients_per_round=m, rounds=pplan.rounds,
                **pplan.client,
            )  # fmt: skip
            ev = {
                "eval-max-clients": pplan.eval_max_clients,
                "round-timeout-s": pplan.round_timeout_s,
            }
            name = f"pop-{n}-{m}"
            if _wanted(pplan, "no-dp"):
                rows[f"{name}-no-dp"] = federated_row(
                    f"{name}-no-dp", base, out, plan, seed, dp_mode="none", **common,
                    extra={**ev, "client-sampling": "uniform"},
                )  # fmt: skip
            for strategy in pplan.strategies:
                if _wanted(pplan, f"no-dp+{strategy}"):
                    keys = {"strategy": strategy, **pplan.server.get(strategy, {})}
                    rows[f"{name}-no-dp+{strategy}"] = federated_row(
                        f"{name}-no-dp+{strategy}", base, out, plan, seed, dp_mode="none",
                        **common, extra={**ev, "client-sampling": "uniform", **keys},
                    )  # fmt: skip
            dp = dict(dp_mode="user", target_epsilon=8.0, **common)
            if _wanted(pplan, "user-dp"):
                rows[f"{name}-user-dp"] = federated_row(
                    f"{name}-user-dp", base, out, plan, seed, **dp, user_clip=1.0, extra=ev
                )
            adaptive = {"user-clip-quantile": pplan.clip_quantile, "user-clip-lr": pplan.clip_lr}
            if _wanted(pplan, "adaptive"):
                rows[f"{name}-user-dp+adaptive"] = federated_row(
                    f"{name}-user-dp+adaptive", base, out, plan, seed, **dp,
                    user_clip=pplan.initial_clip, extra={**ev, **adaptive},
                )  # fmt: skip
            for strategy in pplan.strategies:
                if not _wanted(pplan, strategy):
                    continue
                keys = {"strategy": strategy, **pplan.server.get(strategy, {})}
                rows[f"{name}-user-dp+{strategy}"] = federated_row(
                    f"{name}-user-dp+{strategy}", base, out, plan, seed, **dp,
                    user_clip=pplan.initial_clip, extra={**ev, **keys, **adaptive},
                )  # fmt: skip
    return rows


def _wanted(pplan: PopulationPlan, row: str) -> bool:
    return not pplan.rows or row in pplan.rows


def population_shares(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each population DP row's gain over its round 0, as a share of its ``no-dp`` row's
    (and, for ``user-dp+S``, of its ``no-dp+S`` row's)."""

    def gain(r: dict[str, Any]) -> float:
        return float(r["eval_accuracy"] - r["baseline_accuracy"])

    out: dict[str, float | None] = {}
    for name, r in rows.items():
        if not name.startswith("pop-") or "-user-dp" not in name:
            continue
        stem, _, variant = name.partition("-user-dp")
        refs = {"no_dp": rows.get(f"{stem}-no-dp")}
        if variant.startswith("+") and variant != "+adaptive":
            refs[f"no_dp{variant}"] = rows.get(f"{stem}-no-dp{variant}")
        for label, ref in refs.items():
            if ref is not None:
                ref_gain = gain(ref)
                out[f"{name}_share_of_{label}_gain"] = gain(r) / ref_gain if ref_gain > 0 else None
    return out


def gains(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The issue's targets; gains of federated rows are against their own round 0 (the
    same evaluation as the ``base`` row)."""

    def gain(name: str) -> float | None:
        r = rows.get(name)
        if r is None:
            return None
        start = r.get("baseline_accuracy", rows["base"]["eval_accuracy"])
        return float(r["eval_accuracy"] - start)

    out: dict[str, float | None] = population_shares(rows)
    if "base" not in rows:  # --populations-only
        return out
    central, fed, rec = gain("centralized"), gain("fed-no-dp"), gain("fed-record-dp")
    if central and fed is not None:
        out["fed_no_dp_gap_closed"] = fed / central
    if fed and rec is not None:
        out["record_dp_gain_kept"] = rec / fed
    fed_head = gain("fed-no-dp-head")
    if fed_head and rec is not None:
        out["record_dp_gain_kept_vs_fed_no_dp_head"] = rec / fed_head
    uniform = gain("fed-record-dp-uniform")
    if fed and uniform is not None:
        out["record_dp_gain_kept_uniform_sampling"] = uniform / fed
    users = sorted(
        (int(k.rsplit("-", 1)[1]), gain(k))
        for k in rows
        if k.startswith("fed-user") and "+" not in k
    )
    for n, g in users:
        out[f"user_dp_{n}_gain"] = g
    for k in rows:
        if "+" in k:  # strategy rows: gain, and share of the plain fedavg row's gain
            plain, g = k.split("+")[0], gain(k)
            out[f"{k}_gain"] = g
            if (ref := gain(plain)) is not None and ref > 0 and g is not None:
                out[f"{k}_over_fedavg"] = g / ref
    # Upload per unit of LoRA rank (bytes are linear in the rank): fed-no-dp (fedavg,
    # A and B) against the first ffa row (B only) that adapts the same modules (the
    # record-DP row also adapts the output head).
    same_modules = rows.get("fed-no-dp", {}).get("client_settings", {}).get("lora-head")
    ffa_rows = [
        k
        for k in rows
        if rows[k].get("aggregation") == "ffa"
        and rows[k].get("client_settings", {}).get("lora-head") == same_modules
    ]
    if "fed-no-dp" in rows and ffa_rows:

        def per_rank(r: dict[str, Any]) -> float:
            return float(r["upload_bytes_per_client_per_round"] / r["client_settings"]["lora-rank"])

        out["ffa_over_fedavg_upload"] = per_rank(rows[ffa_rows[0]]) / per_rank(rows["fed-no-dp"])
    return out


def _base_model(args: argparse.Namespace, tmp: Path, seed: int) -> Path:
    if args.base_model:
        return Path(args.base_model)
    if args.quick:
        from simulation import BasePreset, init_base_model
        from simulation.data import generate_public_texts

        preset = BasePreset("micro", 512, 64, 2, 4, 2, 128, 32, 30, 8, 3e-3)
        if not (tmp / "micro").exists():
            init_base_model(
                tmp / "micro", public_texts=generate_public_texts(600, 0), preset=preset, seed=0
            )
        return tmp / "micro"
    from simulation import ensure_base_model

    return ensure_base_model(Path.home() / ".cache" / "fedota", preset="tiny", seed=seed)


def run_seed(args: argparse.Namespace, plan: Plan, tmp: Path, seed: int) -> dict[str, Any]:
    """Every row for one seed (data, base model, initialisation and client sampling)."""
    started = time.monotonic()
    base = _base_model(args, tmp, seed)
    out = tmp / f"seed-{seed}"
    if args.populations:
        pplan = _population_plan(args)
        pop = population_rows(pplan, base, out, plan, seed)
        if args.populations_only:
            return _finish(seed, base, pop, started)
    rows = trainer_rows(base, plan, seed)
    common = dict(num_clients=plan.clients, clients_per_round=plan.clients_per_round)
    no_dp = dict(dp_mode="none", aggregation="fedavg", local_steps=plan.local_steps)
    rows["fed-no-dp"] = federated_row("fed-no-dp", base, out, plan, seed, **no_dp, **common)
    # The record-DP default also adapts the output head: the same non-private run
    # with the head shows that its gain is not bought by a larger adapter alone.
    rows["fed-no-dp-head"] = federated_row(
        "fed-no-dp-head", base, out, plan, seed, lora_head=True, **no_dp, **common
    )
    record = dict(dp_mode="record", target_epsilon=8.0, aggregation="ffa", **plan.record_dp)
    rows["fed-record-dp"] = federated_row(
        "fed-record-dp", base, out, plan, seed, **record, **common
    )
    # The sampling before balanced sampling: each round drawn alone (a phone may be
    # drawn in every round or in none).
    rows["fed-record-dp-uniform"] = federated_row(
        "fed-record-dp-uniform", base, out, plan, seed, **record, **common,
        extra={"client-sampling": "uniform"},
    )  # fmt: skip
    for n in plan.user_populations:
        rows[f"fed-user-dp-{n}"] = federated_row(
            f"fed-user-dp-{n}", base, out, plan, seed, **_user_dp(plan, n),
            extra={"eval-max-clients": plan.eval_max_clients},
        )  # fmt: skip
    for strategy in args.strategies:
        if strategy == "fedavg":
            continue  # today's rows
        keys = {"strategy": strategy, **STRATEGY_KEYS[strategy]}
        rows[f"fed-no-dp+{strategy}"] = federated_row(
            f"fed-no-dp+{strategy}", base, out, plan, seed, **no_dp, **common, extra=keys
        )
        for n in plan.user_populations:
            rows[f"fed-user-dp-{n}+{strategy}"] = federated_row(
                f"fed-user-dp-{n}+{strategy}", base, out, plan, seed, **_user_dp(plan, n),
                extra={"eval-max-clients": plan.eval_max_clients, **keys},
            )  # fmt: skip
    if args.populations:
        rows.update(pop)
    return _finish(seed, base, rows, started)


def _population_plan(args: argparse.Namespace) -> PopulationPlan:
    return PopulationPlan(
        populations=tuple(args.populations),
        cohorts=tuple(args.cohorts),
        rounds=args.population_rounds,
        strategies=tuple(args.strategies),
        client={"local_steps": args.population_local_steps, "lora_rank": 8, "seq_len": 64},
        clip_quantile=0.5,
        initial_clip=args.population_initial_clip,
        server=STRATEGY_KEYS,
        eval_max_clients=args.population_eval_clients,
        clip_lr=args.population_clip_lr,
        rows=tuple(args.population_rows),
        round_timeout_s=args.population_round_timeout,
    )


def _user_dp(plan: Plan, n: int) -> dict[str, Any]:
    return dict(
        dp_mode="user",
        target_epsilon=8.0,
        aggregation="ffa",
        num_clients=n,
        clients_per_round=plan.user_clients_per_round,  # fixed: q = m / N falls
        rounds=plan.user_rounds,
        **plan.user_dp,
    )


def _finish(
    seed: int, base: Path, rows: dict[str, dict[str, Any]], started: float
) -> dict[str, Any]:
    return {
        "seed": seed,
        "base_model": str(base),
        "rows": rows,
        "ratios": gains(rows),
        "wall_s": round(time.monotonic() - started, 1),
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row, the median accuracy and loss over seeds; per target, the median ratio."""
    rows = {
        name: {
            key: statistics.median(r["rows"][name][key] for r in runs)
            for key in ("eval_accuracy", "eval_loss", "heldout_clients_accuracy")
        }
        for name in runs[0]["rows"]
    }
    keys = dict.fromkeys(key for r in runs for key in r["ratios"])  # every seed's, in order
    ratios = {
        key: statistics.median(vals)
        for key in keys
        if (vals := [r["ratios"][key] for r in runs if r["ratios"].get(key) is not None])
    }
    return {"rows": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="micro base, small populations")
    parser.add_argument("--base-model", default=None, help="base model directory")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="one full run per seed (data, base model, init, sampling); medians are reported",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[],
        choices=STRATEGIES,
        help="add rows with these strategies beside today's fedavg ones (and in the "
        "--populations rows, adaptive-clip rows with each)",
    )
    parser.add_argument(
        "--populations",
        type=int,
        nargs="+",
        default=[],
        help="user-level DP at population scale: these populations (e.g. 1000 10000)",
    )
    parser.add_argument(
        "--cohorts", type=int, nargs="+", default=[50], help="expected clients per round"
    )
    parser.add_argument("--population-rounds", type=int, default=10)
    parser.add_argument("--population-local-steps", type=int, default=3)
    parser.add_argument("--population-eval-clients", type=int, default=16)
    parser.add_argument(
        "--population-initial-clip",
        type=float,
        default=1.0,
        help="the adaptive rows' first clip (the fixed rows clip at 1.0)",
    )
    parser.add_argument(
        "--population-clip-lr", type=float, default=0.2, help="η_C of the adaptive clip"
    )
    parser.add_argument(
        "--population-rows",
        nargs="+",
        default=[],
        help="run only these population rows: no-dp, user-dp, adaptive, no-dp+S and/or "
        "strategy names S (to split a long run; shares need the no-dp row in the same file)",
    )
    parser.add_argument(
        "--population-round-timeout",
        type=float,
        default=600.0,
        help="seconds a round waits for its cohort; late replies are dropouts (raise it on a "
        "loaded machine, where a round of 200 clients can take longer)",
    )
    parser.add_argument(
        "--populations-only", action="store_true", help="run only the --populations rows"
    )
    parser.add_argument("--out", default="runs/bench_federated.json")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-fed-") as tmp_name:
        for i, seed in enumerate(args.seeds, 1):
            logger.info("seed %d (%d of %d)", seed, i, len(args.seeds))
            runs.append(run_seed(args, plan, Path(tmp_name), seed))
    result = {
        "benchmark": "bench_federated",
        "quick": args.quick,
        "seeds": args.seeds,
        "plan": plan.__dict__,
        "population_plan": _population_plan(args).__dict__ if args.populations else None,
        "runs": runs,
        "median": medians(runs),
        "wall_s": round(time.monotonic() - started, 1),
        "see_also": "benchmarks/bench_client_train.py for step time and memory",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(report(result))
    return 0


def _seed_report(run: dict[str, Any]) -> list[str]:
    lines = [
        f"seed {run['seed']} (base {run['base_model']}, {run['wall_s']} s)",
        f"{'condition':<24}{'acc':>8}{'loss':>9}{'new-user acc':>14}{'round-0 acc':>13}{'ε':>7}",
    ]
    for name, r in run["rows"].items():
        eps = r.get("epsilon")
        start = r.get("baseline_accuracy")
        lines.append(
            f"{name:<24}{r['eval_accuracy']:>8.4f}{r['eval_loss']:>9.4f}"
            f"{r['heldout_clients_accuracy']:>14.4f}"
            f"{'' if start is None else f'{start:.4f}':>13}"
            f"{eps if eps is None else round(eps, 2)!s:>7}"
        )
    lines.append("settings of the federated rows:")
    for name, r in run["rows"].items():
        if "client_settings" in r:
            sigma = r.get("noise_multiplier")
            lines.append(
                f"  {name}: {r['clients']} clients, {r['clients_per_round']}/round, "
                f"{r['rounds']} rounds, {r['aggregation']}, {r['client_settings']}"
                + ("" if sigma is None else f", σ={sigma:.3f}")
                + f", {r['wall_s']} s"
            )
    return lines


def report(result: dict[str, Any]) -> str:
    """Each seed's table, then the medians over seeds and every seed's target ratios."""
    lines: list[str] = []
    for run in result["runs"]:
        lines += [*_seed_report(run), ""]
    seeds = result["seeds"]
    med = result["median"]
    lines.append(f"median over seeds {seeds}:")
    lines.append(f"{'condition':<24}{'acc':>8}{'loss':>9}{'new-user acc':>14}")
    for name, r in med["rows"].items():
        lines.append(
            f"{name:<24}{r['eval_accuracy']:>8.4f}{r['eval_loss']:>9.4f}"
            f"{r['heldout_clients_accuracy']:>14.4f}"
        )
    lines.append(f"{'target ratio':<40}{'median':>8}" + "".join(f"{f'seed {s}':>9}" for s in seeds))
    for key, value in med["ratios"].items():
        per_seed = [run["ratios"].get(key) for run in result["runs"]]
        lines.append(
            f"{key:<40}{value:>8.3f}"
            + "".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in per_seed)
        )
    lines.append(f"wall: {result['wall_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
