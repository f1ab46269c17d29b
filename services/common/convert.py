"""Conversions between protobuf well-known types and plain Python values."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def optional_timestamp(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


def seconds(ts: Timestamp) -> float:
    return float(ts.ToNanoseconds()) / 1e9
