"""Property-based bad input against the real servers.

For every RPC, hypothesis generates requests with arbitrary and boundary values in every
field (recursively), sent with credentials that get past authentication, so validation
itself is exercised. A second property works below the protobuf layer: random bytes and
serialized requests mutated byte by byte (flips, cuts, insertions, splices), which a
generated client can never send. A deterministic sweep then sets each field, one at a
time, to each boundary value of its type. Only documented status codes may come back,
never UNKNOWN or INTERNAL, never a stack trace or the parser's own words, and never a
hang: each call has a deadline that a correct server meets with a wide margin, and
DEADLINE_EXCEEDED fails the test. Afterwards every server still reports SERVING.
HYPOTHESIS_EXAMPLES raises the number of random examples per RPC (make soak uses more).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from services.launcher.health import check
from tests.support.rpc import POLICY, status_of
from tests.support.stack import PACKAGES, Stack
from tests.support.users import bearer, new_user, user_client

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "50"))
# Every RPC answers bad input in milliseconds; a call still unanswered after this long
# is hanging (a correct server has a margin of a hundred times even on a machine with
# ten times more work than cores).
CALL_DEADLINE_SECONDS = 5.0
DOCUMENTED = {
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "UNAUTHENTICATED",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
}  # fmt: skip
# Hypothesis settings of the random properties. Shrinking a hang would cost a deadline
# per attempt, so failures are reported as generated.
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    phases=[Phase.explicit, Phase.generate],
)

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


@pytest.fixture(scope="module")
def postman(stack: Stack) -> str:
    """A token of a user who sends each fuzzing user a message, so that a subscription
    has something to return at once instead of waiting (correctly) for news."""
    client = user_client(stack)
    token = client.login("fuzz-postman", new_user(client, "fuzz-postman"))
    client.close()
    return token


def credentials(
    stack: Stack, method: MethodDescriptor, cert: str | None, postman: str
) -> tuple[tuple[str, str], ...]:
    """A fresh user's bearer token for public RPCs (with one message waiting for them);
    nothing for certificate callers."""
    if cert is not None:
        return ()
    client = user_client(stack)
    user_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    token = client.login(user_id, new_user(client, user_id))
    client.close()
    if method.server_streaming:
        with stack.channel("relay") as channel:
            relay_grpc.RelayServiceStub(channel).SendMessage(
                relay_pb.SendMessageRequest(recipient_id=user_id, body=b"waiting"),
                metadata=bearer(postman),
                timeout=10,
            )
    return bearer(token)


def problem_with(code: str, text: str) -> str | None:
    """Why an answer is not acceptable, or None."""
    if code == "DEADLINE_EXCEEDED":
        return f"no answer within {CALL_DEADLINE_SECONDS} s: the server hangs on this input"
    if code not in DOCUMENTED:
        return f"undocumented status {code}: {text}"
    for leak in ("Traceback", 'File "', "DecodeError", "Error parsing", "UTF-8"):
        if leak in text:
            return f"{leak!r} in the status message: {text}"
    return None


@pytest.mark.parametrize(("host", "method", "cert"), list(rpcs()))
def test_arbitrary_requests_get_only_documented_statuses(
    stack: Stack, postman: str, host: str, method: MethodDescriptor, cert: str | None
) -> None:
    metadata = credentials(stack, method, cert, postman)
    with stack.channel(host, cert=cert) as channel:

        @PROPERTY
        @given(message_strategy(method.input_type))
        def probe(request: Any) -> None:
            code, text = status_of(
                channel, method, request, metadata, timeout=CALL_DEADLINE_SECONDS
            )
            problem = problem_with(code, text)
            assert problem is None, problem

        probe()


@pytest.mark.parametrize(("host", "method", "cert"), list(rpcs()))
def test_arbitrary_bytes_get_only_documented_statuses(
    stack: Stack, postman: str, host: str, method: MethodDescriptor, cert: str | None
) -> None:
    metadata = credentials(stack, method, cert, postman)
    with stack.channel(host, cert=cert) as channel:

        @PROPERTY
        @given(raw_requests(method.input_type))
        def probe(data: bytes) -> None:
            code, text = status_of(channel, method, data, metadata, timeout=CALL_DEADLINE_SECONDS)
            problem = problem_with(code, text)
            assert problem is None, problem

        probe()


# One boundary value set per field type: sizes just around every documented limit,
# extremes of each integer type, odd characters, and empties.
STRINGS = [
    "",
    " ",
    "a",
    "A",
    "alice",
    "a" * 2,
    "a" * 3,
    "a" * 32,
    "a" * 33,
    "x" * 300,
    "x" * 5000,
    "../../etc",
    "\x00",
    "a\x00b",
    "é" * 70,
    "\U0001f642" * 20,
    "user\n",
    "-",
    ".",
    "_a",
]
BYTE_STRINGS = [
    b"",
    b"\x00",
    bytes(31),
    bytes(32),
    bytes(33),
    b"\xff" * 32,
    bytes(63),
    bytes(64),
    bytes(65),
    bytes(1183),
    bytes(1184),
    bytes(1185),
    bytes(65536),
    bytes(65537),
    bytes(300_000),
]
INTEGERS = {
    FieldDescriptor.TYPE_UINT32: [0, 1, 2, 100, 1000, 1001, 2**31 - 1, 2**31, 2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1],
    FieldDescriptor.TYPE_INT32: [-(2**31), -1, 0, 1, 100, 1000, 1001, 2**31 - 1],
    FieldDescriptor.TYPE_INT64: [-(2**63), -1, 0, 1, 2**63 - 1],
}
TIMESTAMPS = [(-62135596800, 0), (-1, 999_999_999), (0, 0), (1, 0), (253402300799, 999_999_999)]
DURATIONS = [(-315576000000, 0), (-1, 0), (0, 0), (0, 1), (1, 0), (604800, 0), (604801, 0),
             (315576000000, 0)]  # fmt: skip


def boundary_requests(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(label, request) pairs: each field of `descriptor` set alone to each boundary value,
    nested messages recursively."""
    cls = message_factory.GetMessageClass(descriptor)
    for field in descriptor.fields:
        for label, value in _field_values(field, depth):
            message = cls()
            target = getattr(message, field.name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif hasattr(value, "SerializeToString"):
                target.CopyFrom(value)
            else:
                setattr(message, field.name, value)
            yield f"{field.name}{label}", message


def _field_values(field: FieldDescriptor, depth: int) -> Iterator[tuple[str, Any]]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        yield "={}", {"": ""}
        for text in STRINGS:
            yield f"={{{text[:12]!r}: ...}}", {text: text}
        yield "=(101 entries)", {f"k{i}": "v" for i in range(101)}
        return
    singles = list(_single_values(field, depth))
    if not field.is_repeated:
        yield from singles
        return
    for label, value in singles:
        yield f"=[{label.lstrip('=')}]", [value]
    if singles:
        yield "=(1001 items)", [singles[0][1]] * 1001


def _single_values(field: FieldDescriptor, depth: int) -> Iterator[tuple[str, Any]]:
    if field.message_type is not None:
        cls = message_factory.GetMessageClass(field.message_type)
        name = field.message_type.full_name
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            for seconds, nanos in TIMESTAMPS if name.endswith("Timestamp") else DURATIONS:
                yield f"=({seconds}s,{nanos}ns)", cls(seconds=seconds, nanos=nanos)
            return
        yield "={}", cls()
        if depth < 2:
            for label, inner in boundary_requests(field.message_type, depth + 1):
                yield f".{label}", inner
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        values: list[Any] = STRINGS
    elif field.type == FieldDescriptor.TYPE_BYTES:
        values = BYTE_STRINGS
    elif field.type == FieldDescriptor.TYPE_BOOL:
        values = [False, True]
    elif field.enum_type is not None:
        values = [v.number for v in field.enum_type.values] + [999]
    else:
        values = INTEGERS[field.type]
    for value in values:
        yield f"={value!r:.40}", value


@pytest.mark.parametrize(("host", "method", "cert"), list(rpcs()))
def test_every_boundary_value_of_every_field_gets_a_documented_status_in_time(
    stack: Stack, postman: str, host: str, method: MethodDescriptor, cert: str | None
) -> None:
    metadata = credentials(stack, method, cert, postman)
    problems = []
    with stack.channel(host, cert=cert) as channel:
        for label, request in boundary_requests(method.input_type):
            code, text = status_of(
                channel, method, request, metadata, timeout=CALL_DEADLINE_SECONDS
            )
            problem = problem_with(code, text)
            if problem is not None:
                problems.append(f"{method.name}({label}): {problem}")
    assert problems == []
