"""Metrics and logs: useful to operators, silent about users."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb

from tests.support.stack import Stack, scrape_metrics
from tests.support.users import bearer, new_user, user_client

ALL = ("identity", "session", "relay", "audit")
MARKERS = {
    "user id": "zed-marker-user",
    "alias": "Alias Marker Zebra",
    "metadata": "Metadata-Marker-Value",
    "user agent": "UA-Marker/9.9",
    "body": "BODY-MARKER-TEXT",
}


def test_metrics_and_logs_tell_operators_what_happened_and_nothing_about_users(
    tmp_path: Path,
) -> None:
    debug = {"LOG_LEVEL": "DEBUG"}
    stack = Stack(tmp_path, ALL, extra_env={name: debug for name in ALL})
    stack.start()
    try:
        client = user_client(stack)
        marker_user = MARKERS["user id"]
        keys = new_user(
            client, marker_user, alias=MARKERS["alias"], metadata={"note": MARKERS["metadata"]}
        )
        token = client.login(marker_user, keys, user_agent=MARKERS["user agent"])
        peer_token = client.login("peer-user", new_user(client, "peer-user"))
        with stack.channel("relay") as channel:
            relay = relay_grpc.RelayServiceStub(channel)
            relay.SendMessage(
                relay_pb.SendMessageRequest(
                    recipient_id=marker_user, body=MARKERS["body"].encode()
                ),
                metadata=bearer(peer_token),
                timeout=10,
            )
            with pytest.raises(grpc.RpcError):
                relay.FetchMessages(
                    relay_pb.FetchMessagesRequest(), metadata=bearer("x" * 43), timeout=10
                )
        with pytest.raises(grpc.RpcError):  # a failed login, with its audit event
            client.session.CreateSession(
                session_pb.CreateSessionRequest(
                    user_id=marker_user, challenge_id="nope", signature=bytes(64)
                ),
                timeout=10,
            )

        identity_metrics = scrape_metrics(stack, "identity")
        register = "/securemsg.identity.v1.IdentityService/RegisterUser"
        assert f'securemsg_rpc_total{{code="OK",method="{register}"}} 2.0' in identity_metrics
        assert "securemsg_rpc_duration_seconds_bucket" in identity_metrics
        assert "securemsg_audit_outbox_backlog" in identity_metrics
        assert "securemsg_integrity_failures_total" in identity_metrics
        relay_metrics = scrape_metrics(stack, "relay")
        assert "securemsg_relay_queued_messages 1.0" in relay_metrics
        assert 'code="UNAUTHENTICATED"' in relay_metrics
        session_metrics = scrape_metrics(stack, "session")
        assert 'method="/securemsg.session.v1.SessionService/CreateSession"' in session_metrics
        for name in ALL:
            assert marker_user not in scrape_metrics(stack, name)
    finally:
        stack.stop()

    logs = {name: stack[name].log() for name in ALL}
    everything = "\n".join(logs.values())
    for what, marker in MARKERS.items():
        assert marker not in everything, f"{what} leaked into a log"
    for secret in (token, peer_token, "127.0.0.1", "Bearer"):
        assert secret not in everything
    rpc_lines = 0
    for line in filter(None, everything.splitlines()):
        entry = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "service", "message"} <= set(entry)
        if entry["message"] == "rpc":
            rpc_lines += 1
            assert entry["request_id"]
    assert rpc_lines > 10
