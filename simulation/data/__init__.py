"""Federated data: the synthetic non-IID generator and the JSONL loader.

Import the names below from here: they are what code outside this package uses.
"""

from simulation.data.jsonl import (
    DataFormatError,
    JsonlOptions,
    describe_skipped,
    load_jsonl,
    read_jsonl_corpus,
    read_jsonl_texts,
)
from simulation.data.partition import (
    FederatedData,
    read_partition,
    tokenize_stats,
    write_partitions,
)
from simulation.data.synthetic import SyntheticConfig, generate_public_texts, generate_synthetic

__all__ = [
    "DataFormatError",
    "FederatedData",
    "JsonlOptions",
    "SyntheticConfig",
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
