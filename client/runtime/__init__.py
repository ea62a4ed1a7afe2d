"""⑧ infer: the on-device runtime, one interface (``interface``) over two backends.

``llamacpp`` runs a GGUF base with llama.cpp (torch-free; what phones run) and
materialises each verified adapter as a GGUF LoRA (``gguf_lora``); ``runtime`` runs an
NF4 checkpoint with transformers + bitsandbytes (the reference, shared with training).
``quantized`` loads any local Hugging Face causal-LM directory as NF4; ``gguf_export``
turns a base into the GGUF file phones load. Importing this package loads neither
torch nor llama.cpp.
"""

from client.runtime.budget import BudgetTooSmallError, MemoryPlan, plan_memory
from client.runtime.interface import (
    POLICIES,
    RUNTIME_KINDS,
    AdapterSpec,
    DeviceRuntime,
    EvalStats,
    Generation,
    RequestTooLargeError,
    open_runtime,
    runtime_kind_of,
)
from client.runtime.quantized import (
    QuantizedModelError,
    is_prequantized,
    keep_float_compute,
    load_quantized,
    nf4_config,
    quantize_checkpoint,
    repacked_layers,
    save_quantized,
)
from client.runtime.runtime import ADAPTER_NAME, QuantizedRuntime, lora_parameters

__all__ = [
    "ADAPTER_NAME",
    "POLICIES",
    "RUNTIME_KINDS",
    "AdapterSpec",
    "BudgetTooSmallError",
    "DeviceRuntime",
    "EvalStats",
    "Generation",
    "MemoryPlan",
    "QuantizedModelError",
    "QuantizedRuntime",
    "RequestTooLargeError",
    "is_prequantized",
    "keep_float_compute",
    "load_quantized",
    "lora_parameters",
    "nf4_config",
    "open_runtime",
    "plan_memory",
    "quantize_checkpoint",
    "repacked_layers",
    "runtime_kind_of",
    "save_quantized",
]
