"""``DIR/summary.json``: the machine-readable result of ``fedota simulate``.

The schema is documented in ``docs/summary-schema.md`` (``schema_version`` 1). Built
from the server's per-round history (round 0 = baseline evaluation), so it is the same
whether a run was resumed or not. Record-level and user-level ε are kept apart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "build_summary", "write_summary"]

SCHEMA_VERSION = 1


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _eval(evaluation: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        "eval_loss": _num(evaluation.get(f"{prefix}-loss")),
        "eval_accuracy": _num(evaluation.get(f"{prefix}-accuracy")),
        "eval_perplexity": _num(evaluation.get(f"{prefix}-perplexity")),
        "eval_tokens": int(evaluation.get(f"{prefix}-tokens", 0)),
    }


def _point(entry: dict[str, Any]) -> dict[str, Any]:
    ev = entry.get("evaluate", {})
    return {
        "round": int(entry["round"]),
        **_eval(ev, "clients"),
        "heldout_clients": _eval(ev, "heldout"),
    }


def _round(entry: dict[str, Any], dp_mode: str) -> dict[str, Any]:
    tr = entry.get("train", {})
    trained = int(tr.get("clients-trained", 0))
    upload = int(tr.get("upload-bytes", 0))
    return {
        **_point(entry),
        "train_loss": _num(tr.get("train-loss")),
        "clients_sampled": int(tr.get("clients-sampled", 0)),
        "clients_trained": trained,
        "clients_failed": int(tr.get("clients-failed", 0)),
        "clients_rejected": int(tr.get("clients-rejected", 0)),
        "clients_dropped": int(tr.get("clients-dropped", 0)),
        "clients_budget_exhausted": int(tr.get("clients-budget-exhausted", 0)),
        "applied": bool(tr.get("round-applied", 0)),
        "upload_bytes": upload,
        "upload_bytes_per_client": upload // trained if trained else 0,
        "epsilon": {
            "record_level": _num(tr.get("record-epsilon")) if dp_mode == "record" else None,
            "user_level": _num(tr.get("user-epsilon")) if dp_mode == "user" else None,
        },
        "elapsed_s": round(float(entry.get("elapsed_s", 0.0)), 3),
    }


def _privacy(
    rounds: list[dict[str, Any]], history: list[dict[str, Any]], run_config: dict[str, Any]
) -> dict[str, Any]:
    mode = str(run_config.get("dp-mode", "none"))
    last_train = history[-1].get("train", {}) if history else {}
    delta = float(run_config.get("delta", 1e-5))
    record = user = None
    if mode == "record":
        record = {
            "epsilon": rounds[-1]["epsilon"]["record_level"] if rounds else None,
            "delta": delta,
            "noise_multiplier": _num(
                max(
                    (h.get("train", {}).get("client-noise-multiplier", 0.0) for h in history),
                    default=0.0,
                )
            ),
            "clip": float(run_config.get("max-grad-norm", 1.0)),
            "accountant": str(run_config.get("accountant", "prv")),
            "unit": "one training example (packed text block) of one device",
            "note": "largest cumulative ε over devices, from each device's privacy ledger; "
            "noise_multiplier is the largest σ any device used (a device scheduled in fewer "
            "rounds spends its ε over fewer rounds, with a smaller σ)",
        }
    if mode == "user":
        user = {
            "epsilon": _num(last_train.get("user-epsilon")),
            "delta": delta,
            "noise_multiplier": _num(last_train.get("user-noise-multiplier")),
            "clip": float(run_config.get("user-clip", 0.0)),
            "sample_rate": None,
            "accountant": "pld (dp-accounting), Poisson-subsampled Gaussian per round",
            "unit": "all data of one client",
        }
    active = record or user or {}
    return {
        "mode": mode,
        "epsilon": active.get("epsilon"),
        "delta": delta if active else None,
        "noise_multiplier": active.get("noise_multiplier"),
        "clip": active.get("clip"),
        "record_level": record,
        "user_level": user,
    }


def build_summary(
    *,
    history: list[dict[str, Any]],
    run_config: dict[str, Any],
    num_clients: int,
    num_heldout_clients: int,
    elapsed_s: float,
) -> dict[str, Any]:
    """Turn the server's history into the ``summary.json`` document.

    Raises:
        ValueError: the history lacks round 0 (the baseline).
    """
    if not history or int(history[0]["round"]) != 0:
        raise ValueError("history must start with round 0 (the baseline evaluation)")
    mode = str(run_config.get("dp-mode", "none"))
    rounds = [_round(h, mode) for h in history[1:]]
    privacy = _privacy(rounds, history, run_config)
    if privacy["user_level"] is not None:
        n = max(num_clients, 1)
        privacy["user_level"]["sample_rate"] = min(
            1.0, int(run_config.get("clients-per-round", 1)) / n
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "config": {
            "clients": num_clients,
            "heldout_clients": num_heldout_clients,
            "clients_per_round": int(run_config.get("clients-per-round", 0)),
            "client_sampling": (
                "poisson" if mode == "user" else run_config.get("client-sampling", "balanced")
            ),
            "rounds": int(run_config.get("num-server-rounds", len(rounds))),
            "aggregation": run_config.get("aggregation"),
            "dp_mode": mode,
            "target_epsilon": _num(run_config.get("target-epsilon")) if mode != "none" else None,
            "local_steps": int(run_config.get("local-steps", 0)),
            "lora_rank": int(run_config.get("lora-rank", 0)),
            "lora_head": bool(run_config.get("lora-head", False)),
            "learning_rate": _num(run_config.get("learning-rate")),
            "batch_size": run_config.get("batch-size"),
            "seq_len": run_config.get("seq-len"),
            "seed": int(run_config.get("seed", 0)),
            "base_model": run_config.get("base-model"),
        },
        "baseline": _point(history[0]),
        "final": _point(history[-1]),
        "rounds": rounds,
        "privacy": privacy,
        "elapsed_s": round(elapsed_s, 3),
    }


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``out_dir/summary.json`` atomically (temp file, fsync, rename).

    Raises:
        OSError: the directory cannot be written.
    """
    path = out_dir / "summary.json"
    tmp = out_dir / ".summary.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
