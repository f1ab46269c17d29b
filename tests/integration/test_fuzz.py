"""Property-based bad input against the real servers.

For every RPC, hypothesis generates requests with arbitrary and boundary values in every
field (recursively), sent with credentials that get past authentication, so validation
itself is exercised. A second property works below the protobuf layer: random bytes and
serialized requests mutated byte by byte (flips, cuts, insertions, splices), which a
generated client can never send. Only documented status codes may come back, never
UNKNOWN or INTERNAL, never a stack trace or the parser's own words; afterwards every
server still reports SERVING. HYPOTHESIS_EXAMPLES raises the number of examples per RPC
(make soak uses more).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.launcher.health import check
from tests.support.rpc import POLICY, status_of
from tests.support.stack import PACKAGES, Stack
from tests.support.users import new_user, user_client

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "20"))
DOCUMENTED = {
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "UNAUTHENTICATED",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED",
}  # fmt: skip

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "a", "alice", "a" * 32, "a" * 33, "x" * 300, "../../etc", "\x00", "é" * 70]
    ),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{2,31}", fullmatch=True),
)
BYTES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"", bytes(31), bytes(32), bytes(33), bytes(64), bytes(1184), bytes(70_000)]),
)
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
INT32 = st.integers(-(2**31), 2**31 - 1)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(
            lambda s, n: cls(seconds=s, nanos=n),
            st.integers(-62135596800, 253402300799), st.integers(0, 999_999_999),
        )  # fmt: skip
    if descriptor.full_name == "google.protobuf.Duration":
        return st.builds(lambda s: cls(seconds=s), st.integers(-(10**9), 10**9))
    fields = {}
    for field in descriptor.fields:
        value = field_strategy(field, depth)
        if value is not None:
            fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields).map(lambda values: _build(cls, values))


def _build(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = getattr(message, name)
        if isinstance(value, dict):
            field.update(value)
        elif isinstance(value, list):
            field.extend(value)
        elif hasattr(value, "SerializeToString"):
            field.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return st.dictionaries(TEXT, TEXT, max_size=20)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth > 2 or field.message_type is None:
            return None
        inner = message_strategy(field.message_type, depth + 1)
    else:
        inner = {
            FieldDescriptor.TYPE_STRING: TEXT,
            FieldDescriptor.TYPE_BYTES: BYTES,
            FieldDescriptor.TYPE_UINT32: UINT32,
            FieldDescriptor.TYPE_UINT64: UINT64,
            FieldDescriptor.TYPE_INT32: INT32,
            FieldDescriptor.TYPE_BOOL: st.booleans(),
        }[field.type]
    if field.is_repeated:
        return st.lists(inner, max_size=5)
    return inner


@st.composite
def mutated(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """A serialized request with a few byte-level edits."""
    data = bytearray(draw(message_strategy(descriptor)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "splice", "varint"]))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "cut":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 16))]
        elif edit == "varint":  # an over-long or unterminated varint, a classic parser trap
            data[at:at] = b"\xff" * draw(st.integers(1, 11))
    return bytes(data)


def raw_requests(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(descriptor))


def rpcs() -> Iterator[Any]:
    for key, (host, allowed) in POLICY.items():
        service = key[0] if isinstance(key, tuple) else key
        for method in service.methods:
            cert = sorted(allowed)[0] if allowed else None
            yield pytest.param(host, method, cert, id=f"{host}:{service.name}.{method.name}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    relaxed = {"session": {"LOGIN_CHALLENGES_PER_MINUTE": "100000"}}
    stack = Stack(tmp_path_factory.mktemp("fuzz"), tuple(PACKAGES), extra_env=relaxed)
    stack.start()
    yield stack
    for name in PACKAGES:  # every server survived everything
        address = stack[name].env["LISTEN_ADDRESS"]
        assert check(address, PACKAGES[name], stack.layout.tls / "ca.pem") == "SERVING", name
    stack.stop()


def credentials(stack: Stack, cert: str | None) -> tuple[tuple[str, str], ...]:
    """A fresh user's bearer token for public RPCs; nothing for certificate callers."""
    if cert is not None:
        return ()
    client = user_client(stack)
    user_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    token = client.login(user_id, new_user(client, user_id))
    client.close()
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(("host", "method", "cert"), list(rpcs()))
def test_arbitrary_requests_get_only_documented_statuses(
    stack: Stack, host: str, method: MethodDescriptor, cert: str | None
) -> None:
    metadata = credentials(stack, cert)
    with stack.channel(host, cert=cert) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(message_strategy(method.input_type))
        def probe(request: Any) -> None:
            code, text = status_of(channel, method, request, metadata, timeout=5)
            assert code in DOCUMENTED, (code, text)
            assert "Traceback" not in text
            assert 'File "' not in text

        probe()


@pytest.mark.parametrize(("host", "method", "cert"), list(rpcs()))
def test_arbitrary_bytes_get_only_documented_statuses(
    stack: Stack, host: str, method: MethodDescriptor, cert: str | None
) -> None:
    metadata = credentials(stack, cert)
    # A stream that parsed its request waits for messages: a short deadline ends it.
    timeout = 1 if method.server_streaming else 5
    with stack.channel(host, cert=cert) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(raw_requests(method.input_type))
        def probe(data: bytes) -> None:
            code, text = status_of(channel, method, data, metadata, timeout=timeout)
            assert code in DOCUMENTED, (code, text)
            for leak in ("Traceback", 'File "', "DecodeError", "Error parsing", "UTF-8"):
                assert leak not in text, (code, text)

        probe()
