"""The catalog (services/common/catalog.py) states who may call each internal API once;
docs/ARCHITECTURE.md states it for people. They must say the same."""

from __future__ import annotations

import re
from pathlib import Path

from services.common import catalog
from services.protocol.ports import PERSISTENT, SERVICES

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"
ROW = re.compile(r"^\| `(\w+)`( \(public\))?[^|]* \| ([^|]+) \|$")


def documented() -> dict[str, frozenset[str]]:
    table: dict[str, frozenset[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        match = ROW.match(line)
        if match and not match.group(2):
            # "identity (revocation on deactivation), operator" -> {"identity", "operator"}
            names = re.sub(r"\([^)]*\)", "", match.group(3))
            table[match.group(1)] = frozenset(n.strip() for n in names.split(","))
    return table


def test_the_documented_allow_lists_are_the_enforced_ones() -> None:
    enforced = {a.descriptor.name: a.callers for a in catalog.APIS if a.callers is not None}
    assert documented() == enforced


def test_each_service_has_one_public_api_and_each_database_an_admin_api() -> None:
    assert [catalog.public_api(s).full_name for s in SERVICES] == [
        "securemsg.identity.v1.IdentityService",
        "securemsg.session.v1.SessionService",
        "securemsg.relay.v1.RelayService",
        "securemsg.audit.v1.AuditService",
    ]
    hosts = [a.host for a in catalog.APIS if a.descriptor.name == "DatabaseAdminService"]
    assert hosts == list(PERSISTENT)


def test_who_calls_whom_follows_from_the_allow_lists() -> None:
    assert {s: catalog.peers_of(s) for s in SERVICES} == {
        "identity": ("session", "audit"),
        "session": ("identity", "audit"),
        "relay": ("identity", "session", "audit"),
        "audit": ("session",),
    }
