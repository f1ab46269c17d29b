"""Who the transport authenticated for the current call, as the server interceptor saw it.

Over TLS that is the verified client certificate's name, and only on the internal port
(the public port asks for no certificate). In plaintext development mode there are no
names: a loopback caller on the internal port stands for every name (`LOOPBACK`), and
nobody on the public port is anyone but an anonymous client.
"""

from __future__ import annotations

import contextvars

LOOPBACK = "loopback"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


def service_caller() -> str | None:
    """The authenticated service or operator name of this call, or None for end users."""
    return _current.get()


def set_service_caller(name: str | None) -> None:
    _current.set(name)
