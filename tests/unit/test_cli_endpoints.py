"""The CLI finds the services where docker-compose.yml's port variables put them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.__main__ import _endpoints
from services.protocol.ports import DEFAULT_PORTS, internal_port


def test_default_ports_without_variables() -> None:
    endpoints = _endpoints(Path("ca.pem"), "127.0.0.1", {})
    assert endpoints.ports == DEFAULT_PORTS
    assert endpoints.internal_ports == {name: internal_port(name) for name in DEFAULT_PORTS}


def test_the_compose_variables_move_public_and_internal_ports() -> None:
    environ = {"RELAY_PUBLIC_PORT": "41053", "AUDIT_INTERNAL_PORT": " 41064 "}
    endpoints = _endpoints(Path("ca.pem"), "127.0.0.1", environ)
    assert endpoints.ports["relay"] == 41053
    assert endpoints.internal_ports["audit"] == 41064
    assert endpoints.ports["identity"] == DEFAULT_PORTS["identity"]


@pytest.mark.parametrize("value", ["abc", "0", "70000", "-1"])
def test_a_bad_port_is_refused_by_name(value: str) -> None:
    with pytest.raises(
        SystemExit, match=f"IDENTITY_PUBLIC_PORT must be a port number, got '{value}'"
    ):
        _endpoints(Path("ca.pem"), "127.0.0.1", {"IDENTITY_PUBLIC_PORT": value})
