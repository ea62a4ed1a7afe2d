"""Internal: the NF4 base with a PEFT LoRA adapter, and adapter tensors in and out.

Invariants:
* Only LoRA parameters require gradients; the NF4 base (``Linear4bit`` weights,
  embeddings, norms, head) is frozen and never handed to an optimizer.
* LoRA A is (re)initialised from ``LoraSettings.init_seed`` with a private
  generator, so every client reproduces the same A (required by FFA-LoRA).
* Adapter names are PEFT state-dict names (``get_peft_model_state_dict``), i.e.
  parameter names without the adapter name ``.default``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from client.runtime import ADAPTER_NAME, lora_parameters
from client.train.errors import AdapterMismatchError, PrivacyGuardError
from client.train.settings import LoraSettings

logger = logging.getLogger(__name__)

NF4_SUBDIR = "nf4"


def resolve_model_dir(base_dir: Path) -> Path:
    """The directory to load weights from: ``DIR/nf4`` when a pre-quantized copy exists."""
    nf4 = base_dir / NF4_SUBDIR
    return nf4 if (nf4 / "config.json").is_file() else base_dir


def lora_targets(model: Any, lora: LoraSettings) -> list[str] | str:
    """PEFT ``target_modules`` for ``lora``: its names, or ``"all-linear"``, plus the head.

    PEFT's ``"all-linear"`` leaves the output head out and cannot be combined with
    more names, so with ``adapt_head`` the linear projections are listed here: the
    last name component of every ``nn.Linear`` (NF4 ``Linear4bit`` included) and the
    head's own name.

    Raises:
        AdapterMismatchError: ``adapt_head`` on a model without a linear output head.
    """
    if not lora.adapt_head:
        return list(lora.target_modules) if lora.target_modules else "all-linear"
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    head_name = next((n for n, m in modules.items() if m is head and n), None)
    if head_name is None or not isinstance(head, torch.nn.Linear):
        raise AdapterMismatchError(
            f"adapt_head: {type(model).__name__} has no linear output head to adapt; "
            "train without adapt_head (--no-lora-head)"
        )
    if lora.target_modules:
        names = set(lora.target_modules)
    else:
        names = {
            n.rsplit(".", 1)[-1]
            for n, m in modules.items()
            if isinstance(m, torch.nn.Linear) and m is not head
        }
    return sorted(names | {head_name.rsplit(".", 1)[-1]})


def attach_lora(model: Any, lora: LoraSettings) -> Any:
    """Wrap ``model`` in a PEFT LoRA model with a seeded, reproducible A init."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    for name, param in peft_model.named_parameters():
        if ".lora_" not in name or (lora.ffa and ".lora_A." in name):
            param.requires_grad_(False)
    return peft_model


def seeded_lora_init(
    shapes: Mapping[str, tuple[int, ...]], init_seed: int
) -> dict[str, torch.Tensor]:
    """The initial adapter every client (and the runtime, for FFA) rebuilds from a seed.

    A tensors (``.lora_A.``) follow PEFT's default init, kaiming-uniform with
    a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in sorted-name order
    from ``torch.Generator().manual_seed(init_seed)``; B tensors are zero.

    Args:
        shapes: PEFT state-dict name -> shape of every LoRA tensor of the model.
        init_seed: ``LoraSettings.init_seed``.

    Returns:
        name -> float32 tensor.
    """
    gen = torch.Generator().manual_seed(init_seed)
    init: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            init[name] = (torch.rand(shape, generator=gen) * 2 - 1).mul_(bound)
        else:
            init[name] = torch.zeros(shape)
    return init


def _with_rank(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    if ".lora_A." in name:
        return (rank, *shape[1:])
    if ".lora_B." in name:
        return (shape[0], rank, *shape[2:])
    return shape


def _first_slices(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    if ".lora_A." in name:
        return tensor[:rank].contiguous()
    if ".lora_B." in name:
        return tensor[:, :rank].contiguous()
    return tensor


class AdapterSlots:
    """The LoRA parameters of a PEFT model, addressable by exchanged name."""

    def __init__(self, peft_model: Any, lora: LoraSettings) -> None:
        self.lora = lora
        self.params: dict[str, torch.nn.Parameter] = lora_parameters(peft_model)
        if not self.params:
            raise AdapterMismatchError(
                f"no LoRA layers were attached for target_modules={lora.target_modules}; "
                "name linear modules of the base model (e.g. q_proj, v_proj) or use None"
            )
        self.exchanged = [n for n in self.params if not (lora.ffa and ".lora_A." in n)]
        self._init = self._initial_state()

    def _initial_state(self) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        init_rank = self.lora.init_rank
        if init_rank is not None and init_rank != self.lora.rank:  # ADR 0016: nested init
            shapes = {n: _with_rank(n, s, init_rank) for n, s in shapes.items()}
            init = seeded_lora_init(shapes, self.lora.init_seed)
            init = {n: _first_slices(n, t, self.lora.rank) for n, t in init.items()}
        else:
            init = seeded_lora_init(shapes, self.lora.init_seed)
        return {n: t.to(self.params[n].dtype) for n, t in init.items()}

    def load(self, adapter: Mapping[str, torch.Tensor] | None) -> None:
        """Set the LoRA parameters: ``None`` = the seeded initial adapter.

        Raises:
            AdapterMismatchError: unknown or missing names, wrong shapes, non-finite
                values, or (FFA) an A that differs from the shared seeded init.
        """
        values = dict(self._init)
        if adapter is not None:
            unknown = sorted(set(adapter) - set(self.params))
            missing = sorted(set(self.exchanged) - set(adapter))
            if unknown or missing:
                raise AdapterMismatchError(
                    f"adapter does not match this base/LoRA layout: unknown {unknown[:3]}, "
                    f"missing {missing[:3]}; expected exactly trainable_names()"
                )
            for name, tensor in adapter.items():
                self._check_tensor(name, tensor)
                values[name] = tensor
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(values[name].to(device=p.device, dtype=p.dtype))

    def _check_tensor(self, name: str, tensor: torch.Tensor) -> None:
        p = self.params[name]
        if tuple(tensor.shape) != tuple(p.shape):
            raise AdapterMismatchError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(p.shape)}; was it trained with another LoRA rank or base?"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterMismatchError(f"adapter tensor {name} has NaN/Inf values")
        if (
            self.lora.ffa
            and ".lora_A." in name
            and not torch.equal(tensor.to(self._init[name].dtype), self._init[name])
        ):
            raise AdapterMismatchError(
                f"FFA-LoRA A tensor {name} differs from the shared init of "
                f"init_seed={self.lora.init_seed}; all clients must use the same seed"
            )

    def export(self) -> dict[str, torch.Tensor]:
        """The exchanged tensors, detached CPU copies."""
        return {n: self.params[n].detach().to("cpu").clone() for n in self.exchanged}

    def trainable(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer may update (for FFA only B)."""
        return [self.params[n] for n in self.exchanged]


def check_only_lora_trainable(peft_model: Any, slots: AdapterSlots) -> None:
    """Raise if any parameter other than the exchanged LoRA tensors requires grad.

    Raises:
        PrivacyGuardError: a base parameter (or a frozen FFA A) would be trained.
    """
    allowed = {id(p) for p in slots.trainable()}
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and id(p) not in allowed]
    if bad:
        raise PrivacyGuardError(
            f"parameters outside the exchanged adapter require grad: {bad[:3]}; only "
            "LoRA tensors may be trained on the device"
        )


def base_digest(peft_model: Any) -> str:
    """SHA-256 over every non-LoRA parameter and buffer (name, dtype, shape, bytes).

    NF4 weights include their bitsandbytes quantization state (absmax, nested absmax,
    quant maps), which lives beside the packed tensor rather than in the state dict.
    """
    h = hashlib.sha256()
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in [*peft_model.named_parameters(), *peft_model.named_buffers()]:
        if ".lora_" in name:
            continue
        tensors.append((name, t))
        quant_state = getattr(t, "quant_state", None)
        if quant_state is not None:
            for key, value in quant_state.as_dict(packed=True).items():
                tensors.append((f"{name}.{key}", value))
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
