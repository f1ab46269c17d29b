"""The Prometheus alert rules: valid, unit-tested, and fed by metrics the services export.

promtool comes from Debian's `prometheus` package; a missing promtool fails these tests
with the install command.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import yaml
from securemsg.audit.v1 import audit_admin_service_pb2 as admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from services.relay.model import MESSAGE_OVERHEAD_BYTES
from tests.deployment.podman import REPO
from tests.deployment.tools import PROMTOOL, require
from tests.support.audit import append, events
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

pytestmark = pytest.mark.integration

PROMETHEUS = REPO / "deploy" / "prometheus"
SERVICES = ("identity", "session", "relay", "audit")
RELAY_CAP = 1_000_000


def promtool(*args: str) -> str:
    tool = require(PROMTOOL)["promtool"]
    result = subprocess.run(
        [tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_rules_and_the_scrape_config_are_valid() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_each_alert_fires_when_it_should_and_stays_quiet_otherwise() -> None:
    promtool("test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert tested == _alert_names()  # no alert goes untested


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    relay_cap = {"relay": {"RELAY_MAX_TOTAL_BYTES": str(RELAY_CAP)}}
    stack = Stack(tmp_path_factory.mktemp("alerts"), SERVICES, extra_env=relay_cap)
    stack.start()
    yield stack
    stack.stop()


def test_every_metric_the_alerts_use_is_exported_by_a_service(stack: Stack) -> None:
    exported = set()
    for name in SERVICES:
        exported |= set(re.findall(r"^# TYPE (\w+)", _scrape(stack, name), re.MULTILINE))
    exported |= {f"{name}_total" for name in exported}  # counters are typed without _total
    used = set(re.findall(r"\bsecuremsg_\w+", (PROMETHEUS / "alerts.yml").read_text()))
    assert used
    assert used <= exported, f"alerts use metrics no service exports: {used - exported}"


def test_stored_data_that_fails_its_integrity_check_is_counted(stack: Stack) -> None:
    client = user_client(stack)
    new_user(client, "victim-alerts", alias="Victim")
    new_user(client, "mallory-alerts", alias="Mallory")
    client.close()
    stack["identity"].stop()
    with sqlite3.connect(stack.db_path("identity")) as conn:
        conn.execute(
            "UPDATE users SET alias_ct = (SELECT alias_ct FROM users WHERE id = 1) WHERE id = 2"
        )
    stack["identity"].start()
    assert _sample(stack, "identity", "securemsg_integrity_failures_total") == 0
    with (
        stack.channel("identity", cert="session") as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        internal_grpc.IdentityInternalServiceStub(channel).GetVerifyKey(
            internal_pb.GetVerifyKeyRequest(user_id="mallory-alerts"), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert _sample(stack, "identity", "securemsg_integrity_failures_total") >= 1


def test_a_verify_that_finds_the_audit_log_broken_is_counted(stack: Stack) -> None:
    assert _sample(stack, "audit", "securemsg_audit_verify_failures_total") == 0
    append(stack, events(4))
    assert _verify(stack).ok
    assert _sample(stack, "audit", "securemsg_audit_verify_failures_total") == 0
    stack["audit"].stop()
    with sqlite3.connect(stack.db_path("audit")) as conn:
        conn.execute("DELETE FROM audit_events WHERE sequence = 2")
    stack["audit"].start()
    assert not _verify(stack).ok
    assert _sample(stack, "audit", "securemsg_audit_verify_failures_total") == 1


def test_the_relay_exports_what_counts_against_its_cap(stack: Stack) -> None:
    client = user_client(stack)
    new_user(client, "bob-alerts")
    token = client.login("alice-alerts", new_user(client, "alice-alerts"))
    client.close()
    with stack.channel("relay") as channel:
        relay_grpc.RelayServiceStub(channel).SendMessage(
            relay_pb.SendMessageRequest(recipient_id="bob-alerts", body=b"x" * 1000),
            metadata=bearer(token),
            timeout=10,
        )
    assert _sample(stack, "relay", "securemsg_relay_max_total_bytes") == RELAY_CAP
    charged = _sample(stack, "relay", "securemsg_relay_charged_bytes")
    assert charged == 1000 + MESSAGE_OVERHEAD_BYTES


def _alert_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def _scrape(stack: Stack, name: str) -> str:
    address = stack[name].env["METRICS_ADDRESS"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _sample(stack: Stack, name: str, metric: str) -> float:
    """The sum of a metric's samples (all label sets) on one service's endpoint."""
    pattern = re.compile(rf"^{metric}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(_scrape(stack, name)))


def _verify(stack: Stack) -> admin_pb.VerifyAuditLogResponse:
    with stack.channel("audit", cert="operator") as channel:
        return admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
            admin_pb.VerifyAuditLogRequest(), timeout=10
        )
