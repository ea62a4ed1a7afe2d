"""Federated data: the synthetic non-IID generator, the data-file loaders and the
partitioners (``--partition``, Flower Datasets).

Import the names below from here: they are what code outside this package uses.
"""

from simulation.data.jsonl import (
    DataFormatError,
    JsonlOptions,
    describe_skipped,
    read_jsonl_corpus,
    read_jsonl_texts,
)
from simulation.data.load import load_data_file, load_jsonl, load_synthetic
from simulation.data.partition import (
    FederatedData,
    read_partition,
    tokenize_stats,
    write_partitions,
)
from simulation.data.partitioners import (
    NATURAL,
    PartitionError,
    PartitionRecord,
    PartitionSpec,
    PartitionSpecError,
    parse_partition_spec,
)
from simulation.data.synthetic import SyntheticConfig, generate_public_texts, generate_synthetic

__all__ = [
    "NATURAL",
    "DataFormatError",
    "FederatedData",
    "JsonlOptions",
    "PartitionError",
    "PartitionRecord",
    "PartitionSpec",
    "PartitionSpecError",
    "SyntheticConfig",
    "describe_skipped",
    "generate_public_texts",
    "generate_synthetic",
    "load_data_file",
    "load_jsonl",
    "load_synthetic",
    "parse_partition_spec",
    "read_jsonl_corpus",
    "read_jsonl_texts",
    "read_partition",
    "tokenize_stats",
    "write_partitions",
]
