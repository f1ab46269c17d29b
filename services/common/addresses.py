"""Where a call comes from, and which address budget it counts against.

Two corrections to the bare peer address:

- Behind a reverse proxy every client has the proxy's address. A proxy listed in
  TRUSTED_PROXIES (IP addresses or networks) may name the client in a header
  (TRUSTED_PROXY_HEADER, default `x-forwarded-for`); the header is read from the right,
  skipping trusted proxies, and ignored from any other peer (anyone can send it).
- One IPv6 host usually holds a whole /64, so per-address limits count IPv6 clients per
  /64 network (`limit_key`); an IPv4-mapped IPv6 address counts as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.common.config import Env
from services.common.errors import StartupError
from services.common.peers import Context, peer_host

IPV6_GROUP_PREFIX = 64
DEFAULT_HEADER = "x-forwarded-for"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def limit_key(address: str) -> str:
    """The budget an address counts against: itself, or its /64 network for IPv6."""
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_GROUP_PREFIX), strict=False))
    return str(ip) if ip is not None else address


@dataclass(frozen=True)
class ClientAddresses:
    """Resolves the client address of a call (see the module docstring)."""

    trusted_proxies: Sequence[Network] = ()
    header: str = DEFAULT_HEADER

    def _trusted(self, text: str) -> bool:
        ip = _ip(text)
        return ip is not None and any(ip in network for network in self.trusted_proxies)

    def resolve(self, peer: str, metadata: Iterable[tuple[str, object]]) -> str:
        """The client address, given the peer's address (no port) and the call's metadata."""
        if not self.trusted_proxies or not self._trusted(peer):
            return peer
        hops: list[str] = []
        for key, value in metadata:
            if key == self.header and isinstance(value, str):
                hops.extend(hop.strip() for hop in value.split(","))
        # The right end was written by the trusted proxy; the left end by the client,
        # who may have sent a header of its own. The first untrusted hop from the
        # right is the client the proxies saw.
        for hop in reversed(hops):
            if not self._trusted(hop):
                ip = _ip(hop)
                return str(ip) if ip is not None else peer
        return peer

    def of(self, context: Context) -> str:
        return self.resolve(peer_host(context), context.invocation_metadata() or ())

    @classmethod
    def from_env(cls, env: Env) -> ClientAddresses:
        raw = env.optional("TRUSTED_PROXIES") or ""
        networks: list[Network] = []
        for item in raw.replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise StartupError(
                    f"TRUSTED_PROXIES holds {item!r}, which is not an IP address or network"
                ) from None
        header = env.string("TRUSTED_PROXY_HEADER", DEFAULT_HEADER).lower()
        return cls(tuple(networks), header)
