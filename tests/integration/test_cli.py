"""The command-line tool's flows against real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.__main__ import _demo
from services.client.sdk import Endpoints
from tests.support.stack import Stack


def test_the_demo_delivers_a_message_and_shows_the_audit_trail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = Stack(tmp_path, ("identity", "session", "relay", "audit"))
    stack.start()
    try:
        endpoints = Endpoints(
            ca_file=stack.layout.tls / "ca.pem",
            ports={name: ports[0] for name, ports in stack.ports.items()},
        )
        _demo(endpoints)
    finally:
        stack.stop()
    out = capsys.readouterr().out
    assert "this is end-to-end encrypted." in out
    assert "received from alice-" in out
    trail = out.split("audit trail")[1]
    assert trail.count("user_registered") == 2
    assert trail.count("user_login") == 2
