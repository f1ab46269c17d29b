"""Who may call what: every RPC of every service, from every kind of caller.

Callers: anonymous (public port, no token), a user (public port, bearer token), each
certificate name on the internal port, and on the internal port also an anonymous
caller (TLS without a client certificate) and a stranger (a certificate named
"operator" from another CA). A refusal is PERMISSION_DENIED or UNAUTHENTICATED, or for
the last two the TLS handshake itself; being let in is an answer about the request
(OK or a documented error about its content: the empty request used here is mostly
INVALID_ARGUMENT). Anything else (UNAVAILABLE, DEADLINE_EXCEEDED, UNIMPLEMENTED,
UNKNOWN, INTERNAL) fails the cell whichever outcome was expected, so a service that is
down, hangs or lacks the RPC proves nothing.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from services.launcher.pki import ensure_pki
from tests.support.rpc import POLICY, empty_request, status_of
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

CERTS = ("identity", "session", "relay", "audit", "operator")
STRANGERS = ("anonymous-internal", "stranger")  # internal port, no valid certificate
CALLERS = ("anonymous", "user", *CERTS, *STRANGERS)
ANONYMOUS_OK = {"RegisterUser", "CreateChallenge", "CreateSession", "CreatePasswordSession"}
# What a request that got past authentication and authorization may be answered.
LET_IN = {
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
}  # fmt: skip
REFUSED = {"PERMISSION_DENIED", "UNAUTHENTICATED"}
HANDSHAKE_REFUSED = "refused at the TLS handshake"


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
    if caller in STRANGERS:
        return HANDSHAKE_REFUSED
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


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, with a certificate that claims to be the operator."""
    directory = tmp_path_factory.mktemp("foreign-ca")
    ensure_pki(directory, ("operator",))
    return directory


@pytest.fixture(scope="module")
def postman(stack: Stack) -> str:
    client = user_client(stack)
    token = client.login("matrix-postman", new_user(client, "matrix-postman", one_time=1))
    client.close()
    return token


def fresh_token(stack: Stack, postman: str, method: MethodDescriptor) -> str:
    """A new user per cell (some calls, DeactivateAccount or DeleteSession, are final),
    with a message waiting so that a subscription answers at once."""
    client = user_client(stack)
    user_id = f"matrix-{uuid.uuid4().hex[:12]}"
    token = client.login(user_id, new_user(client, user_id, one_time=1))
    client.close()
    if method.server_streaming:
        with stack.channel("relay") as channel:
            relay_grpc.RelayServiceStub(channel).SendMessage(
                relay_pb.SendMessageRequest(recipient_id=user_id, body=b"waiting"),
                metadata=bearer(postman),
                timeout=10,
            )
    return token


def channel_for(stack: Stack, host: str, caller: str, foreign: Path) -> grpc.Channel:
    if caller in CERTS:
        return stack.channel(host, cert=caller)
    if caller == "anonymous-internal":
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(stack.layout.tls / "ca.pem").read_bytes()
        )
    elif caller == "stranger":
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(stack.layout.tls / "ca.pem").read_bytes(),
            private_key=(foreign / "operator.key").read_bytes(),
            certificate_chain=(foreign / "operator.pem").read_bytes(),
        )
    else:
        return stack.channel(host)
    return grpc.secure_channel(stack[host].env["INTERNAL_LISTEN_ADDRESS"], credentials)


def outcome_of(code: str, text: str) -> str:
    if code in LET_IN:
        return "let in"
    if code in REFUSED:
        return code
    # The server closes the connection when the client has no certificate it trusts;
    # a server that is down says "Connection refused" instead.
    if code == "UNAVAILABLE" and "Socket closed" in text:
        return HANDSHAKE_REFUSED
    return f"neither let in nor refused: {code} {text}"


@pytest.mark.parametrize(("host", "method", "allowed", "caller"), list(cases()))
def test_authorization_matrix(
    stack: Stack,
    postman: str,
    foreign_pki: Path,
    host: str,
    method: MethodDescriptor,
    allowed: frozenset[str] | None,
    caller: str,
) -> None:
    metadata = bearer(fresh_token(stack, postman, method)) if caller == "user" else ()
    with channel_for(stack, host, caller, foreign_pki) as channel:
        code, text = status_of(channel, method, empty_request(method), metadata, timeout=5)
    assert outcome_of(code, text) == expected(method, allowed, caller)


def first_bytes(address: str, ca: Path, certificate: Path | None) -> bytes:
    """What an HTTP/2 server sends after the TLS handshake and the client preface
    (b"" when it closes the connection instead)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if certificate is not None:
        context.load_cert_chain(f"{certificate}.pem", f"{certificate}.key")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as conn,
    ):
        try:
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return conn.recv(9)
        except (ssl.SSLError, ConnectionError):
            return b""


@pytest.mark.parametrize("host", ["identity", "session", "relay", "audit"])
def test_internal_ports_serve_only_holders_of_a_certificate_from_the_deployments_ca(
    stack: Stack, foreign_pki: Path, host: str
) -> None:
    """The handshake refusals above, below gRPC: without a certificate, or with one
    from another CA, the server closes the connection; with the deployment's own it
    answers with HTTP/2 settings."""
    address = stack[host].env["INTERNAL_LISTEN_ADDRESS"]
    ca = stack.layout.tls / "ca.pem"
    assert first_bytes(address, ca, None) == b""
    assert first_bytes(address, ca, foreign_pki / "operator") == b""
    settings = first_bytes(address, ca, stack.layout.tls / "operator")
    assert settings[3:4] == b"\x04"  # the type of an HTTP/2 SETTINGS frame
