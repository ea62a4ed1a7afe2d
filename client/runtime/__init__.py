"""⑧ infer: the on-device quantized runtime.

``quantized`` loads any local Hugging Face causal-LM directory as bitsandbytes NF4 and
saves/loads pre-quantized checkpoints, so a phone never materialises fp16 weights.
"""

from client.runtime.quantized import (
    QuantizedModelError,
    is_prequantized,
    load_quantized,
    nf4_config,
    quantize_checkpoint,
    save_quantized,
)

__all__ = [
    "QuantizedModelError",
    "is_prequantized",
    "load_quantized",
    "nf4_config",
    "quantize_checkpoint",
    "save_quantized",
]
