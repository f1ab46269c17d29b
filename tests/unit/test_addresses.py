"""Client addresses behind trusted proxies, and the budgets per-address limits count."""

from __future__ import annotations

import ipaddress

import pytest

from services.common.addresses import ClientAddresses, limit_key
from services.common.config import Env
from services.common.errors import StartupError

PROXY = ClientAddresses((ipaddress.ip_network("10.0.0.0/8"),))


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unix:/run/sock", "unix:/run/sock"),
    ],
)
def test_ipv6_clients_count_per_64(address: str, key: str) -> None:
    assert limit_key(address) == key


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    metadata = [("x-forwarded-for", "198.51.100.1")]
    assert ClientAddresses().resolve("203.0.113.7", metadata) == "203.0.113.7"


def test_a_header_from_an_untrusted_peer_is_ignored() -> None:
    metadata = [("x-forwarded-for", "198.51.100.1")]
    assert PROXY.resolve("203.0.113.7", metadata) == "203.0.113.7"


def test_a_trusted_proxy_names_the_client() -> None:
    assert PROXY.resolve("10.1.1.1", [("x-forwarded-for", "198.51.100.1")]) == "198.51.100.1"


def test_a_client_cannot_prepend_an_address_of_its_choice() -> None:
    # The client sent "1.1.1.1" itself; the proxy appended what it saw.
    metadata = [("x-forwarded-for", "1.1.1.1, 198.51.100.1")]
    assert PROXY.resolve("10.1.1.1", metadata) == "198.51.100.1"


def test_a_chain_of_trusted_proxies_is_skipped() -> None:
    metadata = [("x-forwarded-for", "198.51.100.1, 10.2.2.2")]
    assert PROXY.resolve("10.1.1.1", metadata) == "198.51.100.1"


def test_a_garbled_hop_counts_as_the_proxy_itself() -> None:
    assert PROXY.resolve("10.1.1.1", [("x-forwarded-for", "not-an-ip")]) == "10.1.1.1"
    assert PROXY.resolve("10.1.1.1", []) == "10.1.1.1"


def test_configuration_from_the_environment() -> None:
    addresses = ClientAddresses.from_env(
        Env({"TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::1", "TRUSTED_PROXY_HEADER": "X-Real-IP"})
    )
    assert addresses.resolve("2001:db8::1", [("x-real-ip", "198.51.100.1")]) == "198.51.100.1"
    with pytest.raises(StartupError, match=r"TRUSTED_PROXIES holds 'proxy\.local'"):
        ClientAddresses.from_env(Env({"TRUSTED_PROXIES": "proxy.local"}))
