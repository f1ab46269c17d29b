"""Loopback ports held bound, never listening, while a stack starts.

The stack's ports (50051 and up, PostgreSQL's 55432, Redis' 56379) lie in Linux's
ephemeral range (32768-60999). While one replica starts, another's outgoing connections
(to PostgreSQL, Redis, a peer) take local ports from that range, and can take the very
port a replica not yet started must listen on: it then refuses to start, "address in
use". A port bound by any socket is never handed out for an outgoing connection, so the
launcher binds every port of the stack first, with SO_REUSEADDR: the servers (gRPC,
nginx, PostgreSQL, Redis and the metrics server all set it too) can still bind and
listen on them, as Linux allows while no other socket listens there.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Iterable
from types import TracebackType


class HeldPorts:
    """`ports` bound on 127.0.0.1 until `close` (0: any free port; `ports` then tells
    which). With `skip_taken`, a port another socket already listens on is left to it
    (a server already running); otherwise that raises OSError."""

    def __init__(self, ports: Iterable[int], *, skip_taken: bool = False) -> None:
        self._sockets: list[socket.socket] = []
        self._finalizer = weakref.finalize(self, _close_all, self._sockets)
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    sock.close()
                    if skip_taken and port != 0:
                        continue
                    raise
                self._sockets.append(sock)
        except BaseException:
            self.close()
            raise
        self.ports = [int(sock.getsockname()[1]) for sock in self._sockets]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> HeldPorts:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
