"""Federated data: the synthetic non-IID generator and the JSONL loader."""

from simulation.data.jsonl import (
    DataFormatError,
    JsonlOptions,
    JsonlTexts,
    describe_skipped,
    load_jsonl,
    read_jsonl_corpus,
    read_jsonl_texts,
)
from simulation.data.partition import (
    Canary,
    ClientData,
    FederatedData,
    TokenStats,
    read_partition,
    tokenize_stats,
    write_partitions,
)
from simulation.data.synthetic import SyntheticConfig, generate_public_texts, generate_synthetic

__all__ = [
    "Canary",
    "ClientData",
    "DataFormatError",
    "FederatedData",
    "JsonlOptions",
    "JsonlTexts",
    "SyntheticConfig",
    "TokenStats",
    "describe_skipped",
    "generate_public_texts",
    "generate_synthetic",
    "load_jsonl",
    "read_jsonl_corpus",
    "read_jsonl_texts",
    "read_partition",
    "tokenize_stats",
    "write_partitions",
]
