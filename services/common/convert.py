"""Conversions between protobuf well-known types and plain Python values."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def optional_timestamp(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


def seconds(ts: Timestamp, field: str = "timestamp") -> float:
    """Seconds since the epoch; InvalidArgument for a Timestamp outside its own rules
    (nanos in 0..999,999,999, years 1 to 9999), which only hand-made bytes can carry."""
    try:
        return float(ts.ToNanoseconds()) / 1e9
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a valid Timestamp: nanos must be 0 to 999999999 and the time "
            "between the years 1 and 9999"
        ) from None
