"""A real ``fedota serve`` holding a real release for the micro base and its GGUF export.

What a device needs to go from nothing to a committed update against the real server,
built the way an operator builds it:

* TUF keys (``delta_packager.trust.init_keys``, what ``fedota keys init`` runs);
* a rank-4 LoRA on the micro base, packaged and signed by ``fedota package --base NF4
  --also-base MICRO.gguf --keys KEYS`` (the main venv's CLI), so the release names the
  GGUF export's fingerprint and a llama.cpp device may install it;
* its golden-prompt loss, measured as the release pipeline does, on the llama.cpp
  runtime over the GGUF with the same adapter, and declared in the provenance, so the
  device's health check (``client.update.health``) has something to compare with;
* ``fedota serve`` on loopback (``simulation.fleet.ota_client.EmbeddedServer``: SQLite,
  fresh random role secrets), the bundle published and rolled out to 100 % through its
  HTTP API (``simulation.fleet.ota_client.Operator``).

Devices then enroll with ``ReleasedServer.enrollment_secret`` and ``ReleasedServer.root``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.repo_helpers import fedota_cli

__all__ = ["GOLDEN", "ReleasedServer", "golden_loss", "micro_lora", "released_server"]

# The device's health check runs these through its runtime with the staged adapter.
GOLDEN = ["hey ana, are we still on for coffee at the blue door", "the city council plan"]
RANK = 4


@dataclass(frozen=True)
class ReleasedServer:
    """A running server with release v1 rolled out to every device on either base.

    Attributes:
        url: Base URL of ``fedota serve`` (loopback).
        enrollment_secret: The fleet's enrollment secret.
        root: The trusted ``root.json`` a device is provisioned with.
        golden: JSON list of the golden prompts the release's loss was measured on.
        version: The released adapter version (1).
        gguf_fingerprint: Fingerprint of the GGUF export the release names.
        loss: The golden-prompt loss the release declares.
    """

    url: str
    enrollment_secret: str
    root: Path
    golden: Path
    version: int
    gguf_fingerprint: str
    loss: float


def micro_lora(nf4: Path, *, seed: int, b_scale: float) -> dict[str, np.ndarray]:
    """Rank-4 LoRA on q_proj and v_proj of every layer of ``nf4``, PEFT state-dict names."""
    cfg = json.loads((nf4 / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    widths = {"q_proj": hidden, "v_proj": cfg["num_key_value_heads"] * head_dim}
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        for module, width in widths.items():
            stem = f"base_model.model.model.layers.{i}.self_attn.{module}"
            out[f"{stem}.lora_A.weight"] = rng.normal(size=(RANK, hidden)).astype(np.float32)
            b = rng.normal(size=(width, RANK)) * b_scale
            out[f"{stem}.lora_B.weight"] = b.astype(np.float32)
    return out


def golden_loss(gguf: Path, tensors: dict[str, np.ndarray], texts: list[str]) -> float:
    """Mean next-token loss over ``texts`` with ``tensors`` attached, on llama.cpp.

    The adapter config ``fedota package`` infers from a bare ``.safetensors`` file:
    alpha = rank, the modules named in the tensor names.
    """
    from client.runtime import open_runtime
    from protocol import LoraShape

    spec = LoraShape(rank=RANK, alpha=float(RANK), target_modules=("q_proj", "v_proj"))
    reserve = sum(int(a.nbytes) for a in tensors.values())
    runtime = open_runtime(gguf, adapter_reserve_bytes=reserve, threads=1)
    try:
        runtime.set_adapter(tensors, spec, version=1)
        return runtime.evaluate(texts).loss
    finally:
        runtime.close()


def _package_release(work: Path, *, nf4: Path, gguf: Path, keys: Path) -> tuple[Path, float]:
    """Package v1 for ``nf4`` and ``gguf`` with ``fedota package``; return it and its loss."""
    from safetensors.numpy import save_file

    tensors = micro_lora(nf4, seed=1, b_scale=0.001)
    adapter = work / "adapter.safetensors"
    save_file(tensors, str(adapter))
    loss = golden_loss(gguf, tensors, GOLDEN)
    provenance = work / "provenance.json"
    provenance.write_text(json.dumps({"round": 1, "eval_metrics": {"loss": loss}}))
    bundle = work / "adapter-v1.fedota"
    result = fedota_cli(
        "package",
        "--new",
        str(adapter),
        "--out",
        str(bundle),
        "--base",
        str(nf4),
        "--also-base",
        str(gguf),
        "--keys",
        str(keys),
        "--provenance",
        str(provenance),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 bases" in result.stdout, result.stdout  # the NF4 base and the GGUF export
    return bundle, loss


@contextmanager
def released_server(work: Path, *, nf4: Path, gguf: Path) -> Iterator[ReleasedServer]:
    """Start ``fedota serve`` in ``work`` holding release v1 for ``nf4`` and ``gguf``.

    Args:
        work: An empty directory for the keys, the bundle and the server's files.
        nf4: The NF4 checkpoint directory the adapter was trained on.
        gguf: A GGUF export of it (what a llama.cpp device runs).

    Raises:
        ServerStartError: the server did not come up.
    """
    from delta_packager import fingerprint_base
    from delta_packager.trust import init_keys
    from simulation.fleet import EmbeddedServer, Operator

    keys = work / "keys"
    init_keys(keys)
    bundle, loss = _package_release(work, nf4=nf4, gguf=gguf, keys=keys)
    golden = work / "golden.json"
    golden.write_text(json.dumps(GOLDEN))
    server = EmbeddedServer(work / "server", keys)
    endpoint = server.start()
    try:
        operator = Operator(endpoint)
        try:
            operator.publish([bundle], keys / "metadata" / "targets.json")
            operator.create_rollout(1, fingerprint_base(nf4), stages=[100])
        finally:
            operator.close()
        yield ReleasedServer(
            url=endpoint.url,
            enrollment_secret=endpoint.enrollment_secret,
            root=keys / "1.root.json",
            golden=golden,
            version=1,
            gguf_fingerprint=fingerprint_base(gguf),
            loss=loss,
        )
    finally:
        server.stop()
