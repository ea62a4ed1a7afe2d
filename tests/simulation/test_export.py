"""`fedota adapter export`: checkpointed (exchanged) global adapter → deployable PEFT dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file, save_file

from client.runtime import QuantizedRuntime
from client.train import LocalTrainer, LoraSettings
from protocol import LoraShape
from simulation import SimulationInputError
from simulation.export import export_adapter, latest_global
from tests.repo_helpers import fedota_cli


@pytest.fixture(scope="module")
def ffa_run(micro_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose checkpoint holds an FFA global adapter (B only)."""
    trainer = LocalTrainer(micro_base, LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7))
    gen = torch.Generator().manual_seed(0)
    exchanged = {
        k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in trainer.initial_adapter().items()
    }
    assert exchanged and all(".lora_B." in k for k in exchanged)
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints" / "round-0002").mkdir(parents=True)
    save_file(
        {k: v.numpy() for k, v in exchanged.items()},
        str(run / "checkpoints" / "round-0002" / "global.safetensors"),
    )
    (run / "checkpoints" / "LATEST").write_text("round-0002\n")
    (run / "summary.json").write_text(
        json.dumps({"config": {"lora_rank": 4, "seed": 7, "aggregation": "ffa"}})
    )
    return run


def test_export_rebuilds_the_shared_a_and_keeps_b(
    ffa_run: Path, micro_base: Path, tmp_path: Path
) -> None:
    path, round_ = latest_global(ffa_run)
    assert round_ == 2
    shape = LoraShape(rank=4, alpha=8.0, init_seed=7, ffa=True)
    first = export_adapter(path, micro_base, tmp_path / "a", shape)
    again = export_adapter(path, micro_base, tmp_path / "b", shape)
    other_seed = export_adapter(
        path, micro_base, tmp_path / "c", LoraShape(rank=4, alpha=8.0, init_seed=8, ffa=True)
    )
    a, b, c = (
        load_file(str(d / "adapter_model.safetensors"))
        for d in (first.path, again.path, other_seed.path)
    )
    exchanged = load_file(str(path))
    assert set(a) > set(exchanged) and first.num_tensors == 2 * len(exchanged)
    for name, value in exchanged.items():
        assert (a[name] == value).all()
    a_names = [n for n in a if ".lora_A." in n]
    assert all((a[n] == b[n]).all() for n in a_names)  # the same seed, the same A
    assert any((a[n] != c[n]).any() for n in a_names)  # another seed, another A
    config = json.loads((first.path / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["fedota"] == {"ffa": True, "init_seed": 7, "head": False}
    assert "lm_head" not in config["target_modules"]


def test_exported_adapter_runs_on_the_device_runtime(
    ffa_run: Path, micro_base: Path, tmp_path: Path
) -> None:
    path, _ = latest_global(ffa_run)
    out = export_adapter(
        path, micro_base, tmp_path / "x", LoraShape(rank=4, alpha=8.0, init_seed=7, ffa=True)
    ).path
    rt = QuantizedRuntime(micro_base / "nf4")
    plain = rt.evaluate(["hey ana, are we still on for coffee at the blue door?"]).loss
    rt.set_adapter(load_file(str(out / "adapter_model.safetensors")), LoraShape(4, 8.0))
    tuned = rt.evaluate(["hey ana, are we still on for coffee at the blue door?"]).loss
    assert tuned != plain


def test_cli_reads_the_shape_from_the_summary(
    ffa_run: Path, micro_base: Path, tmp_path: Path
) -> None:
    result = fedota_cli(
        "adapter",
        "export",
        "--run",
        str(ffa_run),
        "--base-model",
        str(micro_base),
        "--out",
        str(tmp_path / "peft"),
    )
    assert result.returncode == 0, result.stderr
    assert "round 2" in result.stdout and "rank 4" in result.stdout and "FFA" in result.stdout
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_a_run_that_adapted_the_head_exports_it_and_the_runtime_runs_it(
    micro_base: Path, tmp_path: Path
) -> None:
    lora = LoraSettings(rank=4, alpha=8.0, ffa=True, init_seed=7, adapt_head=True)
    trainer = LocalTrainer(micro_base, lora)
    exchanged = {k: torch.full(v.shape, 0.01) for k, v in trainer.initial_adapter().items()}
    run = tmp_path / "run"
    (run / "checkpoints" / "round-0001").mkdir(parents=True)
    save_file(
        {k: v.numpy() for k, v in exchanged.items()},
        str(run / "checkpoints" / "round-0001" / "global.safetensors"),
    )
    (run / "checkpoints" / "LATEST").write_text("round-0001\n")
    config = {"lora_rank": 4, "seed": 7, "aggregation": "ffa", "lora_head": True}
    (run / "summary.json").write_text(json.dumps({"config": config}))
    out = tmp_path / "peft"
    result = fedota_cli(
        "adapter", "export", "--run", str(run), "--base-model", str(micro_base), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "output head too" in result.stdout
    written = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" in written["target_modules"] and written["fedota"]["head"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"} <= (
        set(tensors)
    )
    # a server checkpoint dir has no summary.json: the head is read from the tensors
    again = fedota_cli(
        "adapter", "export", "--run", str(run / "checkpoints"), "--base-model",
        str(micro_base), "--out", str(tmp_path / "peft2"), "--rank", "4", "--alpha", "8",
        "--seed", "7", "--ffa",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "output head too" in again.stdout
    rt = QuantizedRuntime(micro_base / "nf4")
    text = ["hey ana, are we still on for coffee at the blue door?"]
    plain = rt.evaluate(text).loss
    rt.set_adapter(tensors, LoraShape(4, 8.0, tuple(written["target_modules"])))
    assert rt.evaluate(text).loss != plain


def test_nothing_checkpointed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SimulationInputError, match="holds no checkpointed global adapter"):
        latest_global(tmp_path)
