"""Checks for request fields shared by several services, with messages a person can act on."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from services.common.errors import InvalidArgument

USER_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{2,31}")
METADATA_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


def user_id(value: str, field: str = "user_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not USER_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{field} must be 3 to 32 characters of lower-case letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return value


def text(value: str, field: str, *, max_chars: int, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return value
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {max_chars}")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn"} for ch in value):
        raise InvalidArgument(f"{field} must not contain control or unassigned characters")
    return value


def exact_bytes(value: bytes, field: str, length: int) -> bytes:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) != length:
        raise InvalidArgument(f"{field} must be exactly {length} bytes, got {len(value)}")
    return value


def string_map(
    values: Mapping[str, str], field: str, *, max_entries: int, max_value_chars: int
) -> dict[str, str]:
    if len(values) > max_entries:
        raise InvalidArgument(f"{field} has {len(values)} entries; the limit is {max_entries}")
    for key, value in values.items():
        if not METADATA_KEY_PATTERN.fullmatch(key):
            raise InvalidArgument(
                f"{field} keys must be 1 to 32 characters of [a-z0-9_] starting with a letter"
            )
        text(value, f"{field}[{key}]", max_chars=max_value_chars, required=False)
    return dict(values)
