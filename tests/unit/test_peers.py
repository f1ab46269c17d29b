"""Who may call internal APIs: certificate names over TLS, loopback in plaintext mode."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest

from services.common.caller import LOOPBACK, set_service_caller
from services.common.errors import PermissionDenied
from services.common.peers import acts_as_operator, authorize, is_loopback, peer_host


class FakeContext:
    """Just the two things authorization reads from a gRPC servicer context."""

    def __init__(
        self, peer: str, common_name: bytes | None = None, metadata: tuple[Any, ...] = ()
    ) -> None:
        self._peer = peer
        self._auth = {"x509_common_name": [common_name]} if common_name else {}
        self._metadata = metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, Any]:
        return self._auth

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.10:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/run/sock", True),
        ("ipv4:10.0.0.5:5000", False),
        ("ipv6:[2001:db8::1]:443", False),
        ("garbage", False),
    ],
)
def test_loopback_detection(peer: str, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


def test_peer_host_drops_the_port() -> None:
    assert peer_host(FakeContext("ipv6:[2001:db8::1]:443")) == "2001:db8::1"  # type: ignore[arg-type]
    assert peer_host(FakeContext("ipv4:10.0.0.5:5000")) == "10.0.0.5"  # type: ignore[arg-type]


def test_tls_needs_an_allowed_certificate_name() -> None:
    allowed = frozenset({"session"})
    ok = FakeContext("ipv4:10.0.0.5:1", b"session")
    assert authorize(ok, allowed, insecure=False) == "session"  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="may not call"):
        authorize(FakeContext("ipv4:10.0.0.5:1", b"relay"), allowed, insecure=False)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="needs a client certificate"):
        authorize(FakeContext("ipv4:127.0.0.1:1"), allowed, insecure=False)  # type: ignore[arg-type]


def test_plaintext_mode_admits_loopback_callers_only() -> None:
    allowed = frozenset({"session"})
    assert authorize(FakeContext("ipv4:127.0.0.1:1"), allowed, insecure=True) == "loopback"  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="loopback"):
        authorize(FakeContext("ipv4:10.0.0.5:1"), allowed, insecure=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "metadata", "operator"),
    [
        ("operator", (), True),
        ("relay", (), False),
        (None, (), False),  # the public port: never the operator
        (LOOPBACK, (), True),  # plaintext mode, internal port: loopback stands in
        (LOOPBACK, (("authorization", "Bearer t"),), False),  # ... unless it is a user
    ],
)
def test_who_reads_as_the_operator(
    name: str | None, metadata: tuple[Any, ...], operator: bool
) -> None:
    def decide() -> bool:
        set_service_caller(name)  # as the server interceptor does for each call
        return acts_as_operator(FakeContext("ipv4:127.0.0.1:1", metadata=metadata))  # type: ignore[arg-type]

    assert contextvars.copy_context().run(decide) is operator
