"""⑧ infer: the on-device runtime, one interface (``interface``) over two backends.

``llamacpp`` runs a GGUF base with llama.cpp (torch-free; what phones run) and
materialises each verified adapter as a GGUF LoRA (``gguf_lora``); ``runtime`` runs an
NF4 checkpoint with transformers + bitsandbytes (the reference, shared with training);
``backend`` picks one for a base (:func:`open_runtime`). ``quantized`` loads any local
Hugging Face causal-LM directory as NF4; ``gguf_export`` turns a base into the GGUF
file phones load.

Import the names below from here: they are what code outside this package uses. Every
submodule keeps torch, transformers and llama.cpp inside the functions that need them,
so importing this package loads neither torch nor llama.cpp (a device install has
neither torch nor transformers).
"""

from client.runtime.backend import open_runtime, runtime_kind_of
from client.runtime.budget import (
    BudgetTooSmallError,
    MemoryPlan,
    footprint_from_checkpoint,
    plan_memory,
)
from client.runtime.gguf_export import export_gguf
from client.runtime.interface import (
    RUNTIME_KINDS,
    DeviceRuntime,
    EvalStats,
    Generation,
    RequestTooLargeError,
)
from client.runtime.llamacpp import LlamaCppError, LlamaCppRuntime
from client.runtime.memory import MemoryMeter, process_rss_bytes, release_free_memory
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
from client.runtime.runtime import (
    ADAPTER_NAME,
    QuantizedRuntime,
    lora_parameters,
    warm_up_libraries,
)

__all__ = [
    "ADAPTER_NAME",
    "RUNTIME_KINDS",
    "BudgetTooSmallError",
    "DeviceRuntime",
    "EvalStats",
    "Generation",
    "LlamaCppError",
    "LlamaCppRuntime",
    "MemoryMeter",
    "MemoryPlan",
    "QuantizedModelError",
    "QuantizedRuntime",
    "RequestTooLargeError",
    "export_gguf",
    "footprint_from_checkpoint",
    "is_prequantized",
    "keep_float_compute",
    "load_quantized",
    "lora_parameters",
    "nf4_config",
    "open_runtime",
    "plan_memory",
    "process_rss_bytes",
    "quantize_checkpoint",
    "release_free_memory",
    "repacked_layers",
    "runtime_kind_of",
    "save_quantized",
    "warm_up_libraries",
]
