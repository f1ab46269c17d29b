"""The test harness itself: services start from a clean environment on ports nobody
else can take."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.stack import PortReservation, Stack
from tests.support.users import new_user, user_client


def test_services_ignore_variables_exported_by_whoever_runs_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each would change what the tests see if the services inherited it.
    monkeypatch.setenv("DB_MAX_BYTES", "1")
    monkeypatch.setenv("MAX_MESSAGE_BYTES", "10")
    monkeypatch.setenv("SESSION_IDLE_TIMEOUT_SECONDS", "0.001")
    stack = Stack(tmp_path)
    stack.start()
    try:
        client = user_client(stack)
        token = client.login("isolated", new_user(client, "isolated", one_time=50))
        assert client.profile(token).user_id == "isolated"
        client.close()
    finally:
        stack.stop()


def test_a_reserved_port_is_free_for_its_service_and_closed_to_everyone_else() -> None:
    reservation = PortReservation(2)
    try:
        port = reservation.ports[0]
        stranger = socket.socket()
        with pytest.raises(OSError, match="in use"):
            stranger.bind(("127.0.0.1", port))
        stranger.close()
        taken = {socket.create_server(("127.0.0.1", 0)) for _ in range(50)}
        assert not {s.getsockname()[1] for s in taken} & set(reservation.ports)
        for sock in taken:
            sock.close()
        # The service it was reserved for binds and listens (gRPC sets SO_REUSEADDR).
        server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        server.close()
    finally:
        reservation.close()
