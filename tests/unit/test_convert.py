"""Well-known-type conversions: what only hand-made bytes can carry is bad input, not a bug."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import convert
from services.common.errors import InvalidArgument


def test_a_valid_timestamp_converts() -> None:
    assert convert.seconds(Timestamp(seconds=7, nanos=500_000_000)) == 7.5


@pytest.mark.parametrize(
    "ts",
    [
        Timestamp(seconds=7, nanos=1_559_204_863),  # found by the byte-level fuzzer
        Timestamp(seconds=7, nanos=-5),
        Timestamp(seconds=10**12),
    ],
)
def test_an_out_of_range_timestamp_is_invalid_argument_naming_the_field(ts: Timestamp) -> None:
    with pytest.raises(InvalidArgument, match="login_time is not a valid Timestamp"):
        convert.seconds(ts, "login_time")
