"""Who is calling: the service name in a client certificate, or a loopback address.

Internal and admin RPCs are allowed per proto service to a set of caller names, checked
against the verified client certificate's common name. In plaintext development mode
there are no certificates, so only loopback callers are accepted.
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeAlias

import grpc

from services.common import caller
from services.common.errors import PermissionDenied

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# The operator tools' certificate common name; the development CA issues it with the
# services' own (services/launcher/pki.py), a production CA must use the same name.
OPERATOR = "operator"


def certificate_name(context: Context) -> str | None:
    """The verified client certificate's common name, or None without one."""
    auth = context.auth_context()
    names = list(auth.get("x509_common_name") or ())
    return names[0].decode("ascii", "replace") if names else None


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") is local."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_host(context: Context) -> str:
    """The caller's address without the port, for rate limiting and session records."""
    peer = context.peer()
    kind, _, rest = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def acts_as_operator(context: Context) -> bool:
    """Whether the caller of a public API reads as the operator (the audit log: any
    user's events): the operator certificate on the internal port, or in plaintext mode a
    loopback peer on the internal port (see services.common.caller) that sent no bearer
    token; one that did is a user. Nobody on the public port, which a same-host proxy
    may front."""
    name = caller.service_caller()
    if name == OPERATOR:
        return True
    sent_token = any(key == "authorization" for key, _ in context.invocation_metadata() or ())
    return name == caller.LOOPBACK and not sent_token


def authorize(context: Context, allowed: frozenset[str], *, insecure: bool) -> str:
    """Returns the caller's name if it may call this service, else raises PermissionDenied."""
    if insecure:
        if is_loopback(context.peer()):
            return "loopback"
        raise PermissionDenied("this internal API accepts only loopback callers in plaintext mode")
    name = certificate_name(context)
    if name is None:
        raise PermissionDenied(
            "this internal API needs a client certificate from the deployment's CA"
        )
    if name not in allowed:
        raise PermissionDenied(f"client certificate {name!r} may not call this API")
    return name
