"""Who may call what: every RPC of every service, from every kind of caller.

Callers: anonymous (public port, no token), a user (public port, bearer token), and
each certificate name on the internal port. A cell passes when the call gets past
authentication and authorization (any other status, e.g. INVALID_ARGUMENT for the empty
request used here, means it was let in) or is refused with the expected status.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.descriptor import MethodDescriptor

from tests.support.rpc import POLICY, empty_request, status_of
from tests.support.stack import Stack
from tests.support.users import new_user, user_client

CERTS = ("identity", "session", "relay", "audit", "operator")
CALLERS = ("anonymous", "user", *CERTS)
ANONYMOUS_OK = {"RegisterUser", "CreateChallenge", "CreateSession", "CreatePasswordSession"}


def cases() -> Iterator[Any]:
    for key, (host, allowed) in POLICY.items():
        service = key[0] if isinstance(key, tuple) else key
        for method in service.methods:
            for caller in CALLERS:
                yield pytest.param(
                    host,
                    method,
                    allowed,
                    caller,
                    id=f"{host}:{service.name}.{method.name}:{caller}",
                )


def expected(method: MethodDescriptor, allowed: frozenset[str] | None, caller: str) -> str:
    if allowed is not None:  # internal or operator API
        return "let in" if caller in allowed else "PERMISSION_DENIED"
    if method.containing_service.name == "AuditService" and caller == "operator":
        return "let in"
    if caller == "user" or method.name in ANONYMOUS_OK:
        return "let in"
    return "UNAUTHENTICATED"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("authz"), ("identity", "session", "relay", "audit"))
    stack.start()
    yield stack
    stack.stop()


def fresh_token(stack: Stack) -> str:
    """A new user per cell: some calls (DeactivateAccount, DeleteSession) are final."""
    client = user_client(stack)
    user_id = f"matrix-{uuid.uuid4().hex[:12]}"
    token = client.login(user_id, new_user(client, user_id, one_time=1))
    client.close()
    return token


@pytest.mark.parametrize(("host", "method", "allowed", "caller"), list(cases()))
def test_authorization_matrix(
    stack: Stack,
    host: str,
    method: MethodDescriptor,
    allowed: frozenset[str] | None,
    caller: str,
) -> None:
    metadata = (("authorization", f"Bearer {fresh_token(stack)}"),) if caller == "user" else ()
    cert = caller if caller in CERTS else None
    with stack.channel(host, cert=cert) as channel:
        code, _ = status_of(channel, method, empty_request(method), metadata, timeout=5)
    assert code not in {"UNKNOWN", "INTERNAL"}
    outcome = code if code in {"PERMISSION_DENIED", "UNAUTHENTICATED"} else "let in"
    assert outcome == expected(method, allowed, caller)
