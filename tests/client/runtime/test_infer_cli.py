"""``fedota device infer``: the active adapter on the device's base, within the budget,
on both runtimes (llama.cpp over a GGUF export, NF4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.update import ActivePointer, DeviceConfig, DeviceState
from delta_packager import AdapterState, fingerprint_base
from protocol import LoraShape
from tests.repo_helpers import fedota_cli


def _lora_state(nf4: Path, rank: int, seed: int) -> dict[str, np.ndarray]:
    config = json.loads((nf4 / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
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
    out = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            stem = f"base_model.model.model.layers.{layer}.{name}"
            out[f"{stem}.lora_A.weight"] = rng.normal(0, 0.5, (rank, fan_in)).astype(np.float32)
            out[f"{stem}.lora_B.weight"] = rng.normal(0, 0.5, (fan_out, rank)).astype(np.float32)
    return out


@pytest.fixture(scope="module", params=["llamacpp", "nf4"])
def device(
    request: pytest.FixtureRequest,
    micro_base: Path,
    micro_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A device state directory as enrollment + one committed update leave it."""
    nf4 = micro_base / "nf4"
    base = micro_gguf if request.param == "llamacpp" else nf4
    root = tmp_path_factory.mktemp("device")
    state = DeviceState(root)
    fp = fingerprint_base(base)
    state.write_config(
        DeviceConfig(
            "http://127.0.0.1:9", "dev-1", "token", str(base), fp, 64 * 2**20, request.param
        )
    )
    adapter = AdapterState(3, 3, fp, _lora_state(nf4, 4, 0))
    state.write_slot("a", adapter, shape=LoraShape(rank=4, alpha=8.0))
    state.set_active(ActivePointer("a", 3, 3))
    return root


def test_infer_streams_text_with_the_active_adapter(device: Path) -> None:
    result = fedota_cli(
        "device",
        "infer",
        "--state",
        str(device),
        "--prompt",
        "hey ana",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["adapter_version"] == 3 and record["new_tokens"] >= 1
    assert record["runtime"] == json.loads((device / "device.json").read_text())["runtime"]
    assert record["peak_added_bytes"] <= record["budget_bytes"] == 64 * 2**20


def test_infer_refuses_a_budget_below_the_model(device: Path) -> None:
    result = fedota_cli(
        "device", "infer", "--state", str(device), "--prompt", "hey", "--budget-mb", "2"
    )
    assert result.returncode == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: memory budget 2.0 MiB is too small: the ")
    assert "needs at least" in line


def test_infer_on_unenrolled_state_is_a_clear_error(tmp_path: Path) -> None:
    result = fedota_cli("device", "infer", "--state", str(tmp_path), "--prompt", "hey")
    assert result.returncode == 2
    assert "not an enrolled device state directory" in result.stderr
