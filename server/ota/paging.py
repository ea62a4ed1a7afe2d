"""Keyset pagination: opaque cursors and pages, shared by the inventory and the audit log.

A cursor is the sort key of the last row a page returned, tagged with the listing it
belongs to and base64url-encoded: the next page is ``WHERE key > cursor`` (or ``<``)
on an index, never an ``OFFSET``, so rows inserted meanwhile neither repeat nor push
others off a page. Callers treat cursors as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from server.ota.errors import RequestError

T = TypeVar("T")
MAX_PAGE = 500
MAX_CURSOR_CHARS = 400


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: tuple[T, ...]
    next_cursor: str | None


def encode_cursor(listing: str, key: Sequence[Any]) -> str:
    """An opaque cursor for the row whose sort key is ``key`` in ``listing``."""
    raw = json.dumps([listing, list(key)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(listing: str, cursor: str | None, shape: tuple[type, ...]) -> list[Any] | None:
    """The sort key a cursor of ``listing`` carries (None: start at the beginning);
    ``shape`` is the type of each key part.

    Raises:
        RequestError: a cursor this server did not issue for this listing.
    """
    if cursor is None:
        return None
    if len(cursor) > MAX_CURSOR_CHARS:
        raise RequestError(_bad_cursor(listing))
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        tag, key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise RequestError(_bad_cursor(listing)) from exc
    if (
        tag != listing
        or not isinstance(key, list)
        or len(key) != len(shape)
        or not all(type(part) is kind for part, kind in zip(key, shape, strict=True))
    ):
        raise RequestError(_bad_cursor(listing))
    return key


def _bad_cursor(listing: str) -> str:
    return f"cursor is not one this server issued for {listing}; start again without a cursor"


def page_of(
    rows: Sequence[T], limit: int, listing: str, key_of: Callable[[T], Sequence[Any]]
) -> Page[T]:
    """A page from up to ``limit + 1`` rows fetched in key order (the extra row says
    whether another page follows)."""
    items = tuple(rows[:limit])
    more = len(rows) > limit and items
    return Page(
        items=items, next_cursor=encode_cursor(listing, key_of(items[-1])) if more else None
    )


def check_limit(limit: int) -> int:
    """``limit`` if it is a usable page size.

    Raises:
        RequestError: outside 1..MAX_PAGE.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(f"limit {limit} must be between 1 and {MAX_PAGE}")
    return limit
