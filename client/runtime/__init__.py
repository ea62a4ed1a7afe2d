"""⑧ infer: the on-device quantized runtime.

``quantized`` loads any local Hugging Face causal-LM directory as bitsandbytes NF4 and
saves/loads pre-quantized checkpoints, so a phone never materialises fp16 weights.
"""

from client.runtime.budget import BudgetTooSmallError, MemoryPlan, plan_memory
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
    POLICIES,
    AdapterSpec,
    EvalStats,
    Generation,
    QuantizedRuntime,
    RequestTooLargeError,
    lora_parameters,
)

__all__ = [
    "ADAPTER_NAME",
    "POLICIES",
    "AdapterSpec",
    "BudgetTooSmallError",
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
    "plan_memory",
    "quantize_checkpoint",
    "repacked_layers",
    "save_quantized",
]
