"""② aggregate: the Flower ``ServerApp`` and LoRA-aware strategies."""

__all__: list[str] = []
