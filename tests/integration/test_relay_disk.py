"""The relay never writes to disk, proved over its whole life and the whole filesystem.

The relay runs under `strace -f` (Debian's package), which records every syscall that
can create, change or remove a file, in every thread and child, from exec to exit:
opening with write intent (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND, O_TMPFILE),
creat, rename, link, symlink, mkdir, mknod, truncate, unlink and rmdir, whatever the
path. Meanwhile a load calls every relay RPC (the list comes from the protos, so a new
RPC must be added here), with failures, rate limits, capacity refusals, expiry,
revalidated and revoked subscriptions, audit shipping and a graceful stop. Its log
(stderr, opened by the test, not by the relay) must not hold a body either.
"""

from __future__ import annotations

import queue
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from securemsg.relay.v1 import relay_admin_service_pb2 as admin_pb
from securemsg.relay.v1 import relay_admin_service_pb2_grpc as admin_grpc
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb

from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

TRACED = (
    "open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,"
    "mkdir,mkdirat,mknod,mknodat,truncate,unlink,unlinkat,rmdir"
)
WRITE_FLAGS = re.compile(r"\bO_(WRONLY|RDWR|CREAT|TRUNC|APPEND|TMPFILE)\b")
OPENS = ("open(", "openat(", "openat2(")
SECRET = b"relay-secret-body"


def strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.fail("strace is required: apt-get install -y strace (.ci/run installs it)")
    return path


def writes_in(trace_files: list[Path]) -> list[str]:
    """Every traced call with write intent (a failed attempt counts too)."""
    found = []
    for trace in trace_files:
        for line in trace.read_text(errors="replace").splitlines():
            call = line.lstrip()
            if not call or call.startswith(("+++", "---")):
                continue
            if call.startswith(OPENS) and not WRITE_FLAGS.search(call):
                continue  # opened for reading only
            found.append(f"{trace.name}: {call}")
    return found


class Load:
    """Calls every relay RPC, in the ways that take different code paths."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.client = user_client(stack)
        self.tokens = {
            name: self.client.login(name, new_user(self.client, name))
            for name in ("alice", "bob", "carol")
        }
        self.channel = stack.channel("relay")
        self.relay = pb_grpc.RelayServiceStub(self.channel)
        self.done: set[str] = set()
        self.errors: list[BaseException] = []

    def close(self) -> None:
        self.channel.close()
        self.client.close()

    def send(self, sender: str, to: str, body: bytes, ttl: int = 60) -> pb.SendMessageResponse:
        return self.relay.SendMessage(
            pb.SendMessageRequest(recipient_id=to, body=body, ttl=Duration(seconds=ttl)),
            metadata=bearer(self.tokens[sender]),
            timeout=10,
        )

    def SendMessage(self) -> None:
        for n in range(30):
            self.send("alice", "bob", SECRET + b" %d" % n, ttl=1 if n % 3 == 0 else 60)
        with pytest.raises(grpc.RpcError, match="NOT_FOUND"):
            self.send("alice", "nobody-at-all", SECRET)
        with pytest.raises(grpc.RpcError, match="RESOURCE_EXHAUSTED"):
            self.send("alice", "bob", SECRET * 5000)  # over the body cap
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):  # an auth_failed event
            self.relay.SendMessage(
                pb.SendMessageRequest(recipient_id="bob", body=SECRET),
                metadata=bearer("x" * 43),
                timeout=10,
            )
        for _ in range(60):  # carol: up to her limit of 60 a minute, then over it
            self.send("carol", "alice", SECRET)
        with pytest.raises(grpc.RpcError, match="RESOURCE_EXHAUSTED"):
            self.send("carol", "alice", SECRET)

    def FetchMessages(self) -> None:
        reply = self.relay.FetchMessages(
            pb.FetchMessagesRequest(max_messages=50), metadata=bearer(self.tokens["bob"])
        )
        assert any(m.body.startswith(SECRET) for m in reply.messages)
        self.fetched = [m.message_id for m in reply.messages]

    def AcknowledgeMessages(self) -> None:
        reply = self.relay.AcknowledgeMessages(
            pb.AcknowledgeMessagesRequest(message_ids=self.fetched[:10]),
            metadata=bearer(self.tokens["bob"]),
        )
        assert reply.acknowledged_count == 10

    def SendMessages(self) -> None:
        def batch(*recipients: str) -> pb.SendMessagesRequest:
            return pb.SendMessagesRequest(
                messages=[
                    pb.OutgoingMessage(recipient_id=to, body=SECRET + b" group")
                    for to in recipients
                ]
            )

        reply = self.relay.SendMessages(
            batch("alice", "carol"), metadata=bearer(self.tokens["bob"]), timeout=10
        )
        assert len(reply.results) == 2
        for refused, code in ((batch("alice", "nobody-at-all"), "NOT_FOUND"),
                              (batch(), "INVALID_ARGUMENT")):  # fmt: skip
            with pytest.raises(grpc.RpcError, match=code):
                self.relay.SendMessages(refused, metadata=bearer(self.tokens["bob"]), timeout=10)

    def StreamMessages(self) -> None:
        carol = bearer(self.tokens["carol"])
        requests: queue.Queue[pb.StreamMessagesRequest | None] = queue.Queue()
        stream = self.relay.StreamMessages(iter(requests.get, None), metadata=carol, timeout=10)
        pushed = next(iter(stream)).messages
        assert any(m.body.startswith(SECRET) for m in pushed)
        ids = [m.message_id for m in pushed]
        requests.put(pb.StreamMessagesRequest(acknowledged_message_ids=ids))
        deadline = time.monotonic() + 5  # acknowledged on the stream: gone from the queue
        while time.monotonic() < deadline:
            left = self.relay.FetchMessages(pb.FetchMessagesRequest(), metadata=carol)
            if not {m.message_id for m in left.messages} & set(ids):
                break
            time.sleep(0.05)
        else:
            pytest.fail("acknowledgements on the stream removed nothing")
        requests.put(None)
        stream.cancel()  # type: ignore[no-untyped-call]
        oversized = pb.StreamMessagesRequest(acknowledged_message_ids=["x"] * 1001)
        with pytest.raises(grpc.RpcError, match="INVALID_ARGUMENT"):
            list(self.relay.StreamMessages(iter([oversized]), metadata=carol, timeout=10))

    def SubscribeMessages(self) -> None:
        stream = self.relay.SubscribeMessages(
            pb.SubscribeMessagesRequest(), metadata=bearer(self.tokens["alice"]), timeout=10
        )
        self.send("bob", "alice", SECRET + b" live")
        first = next(iter(stream))
        assert first.message.body.startswith(SECRET)
        time.sleep(0.7)  # past the revalidation interval: the token is checked again
        self.client.session.DeleteSession(
            session_pb.DeleteSessionRequest(), metadata=bearer(self.tokens["alice"])
        )
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def GetRelayStats(self) -> None:
        with self.stack.channel("relay", cert="operator") as channel:
            stats = admin_grpc.RelayAdminServiceStub(channel).GetRelayStats(
                admin_pb.GetRelayStatsRequest(), timeout=10
            )
        assert stats.queued_messages > 0

    def Check(self) -> None:  # grpc.health.v1.Health
        with self.stack.channel("relay") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    def ServerReflectionInfo(self) -> None:
        with self.stack.channel("relay") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            assert next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))

    def metrics(self) -> None:
        address = self.stack["relay"].env["METRICS_ADDRESS"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            assert b"securemsg_relay_queued_messages" in response.read()

    def concurrently(self, work: Callable[[int], None], threads: int = 4) -> None:
        def run(worker: int) -> None:
            try:
                work(worker)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)

        pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()


ORDER = (
    "Check", "ServerReflectionInfo", "SendMessage", "FetchMessages", "AcknowledgeMessages",
    "SendMessages", "StreamMessages", "SubscribeMessages", "GetRelayStats",
)  # fmt: skip


def relay_rpcs() -> set[str]:
    names = set()
    for service in (pb.DESCRIPTOR.services_by_name["RelayService"],
                    admin_pb.DESCRIPTOR.services_by_name["RelayAdminService"]):  # fmt: skip
        names |= {method.name for method in service.methods}
    return names | {"Check", "ServerReflectionInfo"}


def test_the_relay_writes_no_file_in_its_whole_life_under_load(tmp_path: Path) -> None:
    traces = tmp_path / "trace"
    traces.mkdir()
    stack = Stack(
        tmp_path / "stack",
        ("identity", "session", "relay", "audit"),
        extra_env={"relay": {
            "RELAY_SWEEP_INTERVAL_SECONDS": "0.2",
            "RELAY_STREAM_REVALIDATE_SECONDS": "0.5",
            "RELAY_SENDS_PER_MINUTE": "60",
            "RELAY_MAX_BODY_BYTES": "4096",
        }},
    )  # fmt: skip
    stack["relay"].wrapper = (
        strace(), "-f", "-ff", "-qq", "--seccomp-bpf", "-s", "200",
        "-e", f"trace={TRACED}", "-o", str(traces / "relay"),
    )  # fmt: skip
    stack.start()
    load = Load(stack)
    try:
        for name in ORDER:
            getattr(load, name)()
            load.done.add(name)
        load.metrics()

        def busy(worker: int) -> None:  # every RPC again, from several clients at once
            for n in range(10):
                sent = load.send("bob", "carol", SECRET + b" %d-%d" % (worker, n))
                reply = load.relay.FetchMessages(
                    pb.FetchMessagesRequest(), metadata=bearer(load.tokens["carol"])
                )
                ids = [m.message_id for m in reply.messages if m.message_id == sent.message_id]
                load.relay.AcknowledgeMessages(
                    pb.AcknowledgeMessagesRequest(message_ids=ids or ["none"]),
                    metadata=bearer(load.tokens["carol"]),
                )

        load.concurrently(busy)
        assert load.errors == []
        time.sleep(1.5)  # messages with a 1 s TTL expire and are swept; audit events ship
    finally:
        load.close()
        stack.stop()  # a graceful stop is part of the life being watched

    assert load.done == relay_rpcs()
    trace_files = sorted(traces.iterdir())
    assert trace_files, "strace recorded nothing"
    assert any("openat(" in f.read_text() for f in trace_files), "the trace saw no open at all"
    assert writes_in(trace_files) == []
    assert SECRET not in stack["relay"].log_path.read_bytes()
