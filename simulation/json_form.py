"""The JSON form of the frozen records ``summary.json`` is made of.

A record's fields, in declaration order, become the keys of its JSON object, so a
record's field order *is* the key order of the document it serialises to. Nested
records, mappings, tuples and ``StrEnum`` members (written as their string) are
converted on the way; everything else is already a JSON value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any

__all__ = ["JsonRecord", "json_form"]


def json_form(value: object) -> Any:
    """``value`` as plain JSON values (``dict``, ``list``, ``str``, numbers, ``None``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_form(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {json_form(k): json_form(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_form(v) for v in value]
    return value


class JsonRecord:
    """Mixin of the frozen dataclasses of ``summary.json``: ``to_dict()`` is their JSON."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object, keys in field order."""
        out: dict[str, Any] = json_form(self)
        return out
