"""Ports held while a stack starts: nobody else gets them, yet the stack's own servers
can listen on them (services/launcher/held_ports.py)."""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
import pytest

from services.launcher.held_ports import HeldPorts


def test_a_held_port_is_given_to_no_other_socket() -> None:
    with HeldPorts([0]) as held:
        (port,) = held.ports
        # As an outgoing connection's local port would be: bound without SO_REUSEADDR.
        with socket.socket() as other, pytest.raises(OSError, match="in use") as refused:
            other.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))  # free again once released


def test_the_stacks_own_grpc_server_still_listens_on_a_held_port() -> None:
    with HeldPorts([0]) as held:
        (port,) = held.ports
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        try:
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            server.stop(None)


def test_a_port_a_running_server_listens_on_is_left_to_it_only_when_asked() -> None:
    with socket.socket() as running:
        running.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        with HeldPorts([port, 0], skip_taken=True) as held:
            assert port not in held.ports
            assert len(held.ports) == 1
        with pytest.raises(OSError, match="in use"):
            HeldPorts([port])
