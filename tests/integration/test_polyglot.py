"""A client in another language, generated from the same protos, against the services."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from tests.support.stack import REPO, Stack
from tests.support.users import bearer, new_user, user_client

CLIENT = REPO / "tests" / "polyglot" / "client.mjs"


def test_a_node_client_registers_logs_in_sends_and_receives_over_tls(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("node and `npm ci` are required (make test installs them)")
    stack = Stack(tmp_path, ("identity", "session", "relay", "audit"))
    stack.start()
    try:
        python = user_client(stack)
        bob_token = python.login("py-bob", new_user(python, "py-bob"))
        pq_key = MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
        process = subprocess.Popen(
            [
                node, str(CLIENT), str(stack.layout.tls / "ca.pem"),
                stack["identity"].env["LISTEN_ADDRESS"], stack["session"].env["LISTEN_ADDRESS"],
                stack["relay"].env["LISTEN_ADDRESS"], "node-alice", "py-bob",
                base64.b64encode(pq_key).decode(),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert process.stdout is not None
        events = []
        for line in process.stdout:
            event = json.loads(line)
            events.append(event)
            if event["event"] == "sent":
                with stack.channel("relay") as channel:
                    relay = relay_grpc.RelayServiceStub(channel)
                    inbox = relay.FetchMessages(
                        relay_pb.FetchMessagesRequest(), metadata=bearer(bob_token), timeout=10
                    ).messages
                    assert [(m.sender_id, m.body) for m in inbox] == [
                        ("node-alice", b"hello from node")
                    ]
                    relay.SendMessage(
                        relay_pb.SendMessageRequest(recipient_id="node-alice", body=b"hi node"),
                        metadata=bearer(bob_token),
                        timeout=10,
                    )
        code = process.wait(30)
        assert code == 0, process.stderr.read() if process.stderr else ""
        assert [e["event"] for e in events] == ["registered", "logged_in", "sent", "received"]
        assert events[-1] == {"event": "received", "from": "py-bob", "body": "hi node"}
        assert len(events[2]["peer_fingerprint"].split(":")) == 16
    finally:
        stack.stop()
