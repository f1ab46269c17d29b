"""The relay on Redis keeps its promise: nothing on disk, no user id in Redis' memory.

A real relay process keeps its queues in the run's private Redis, hardened as in
production (tests/support/redis.py). After a load of sends, fetches and acknowledgements
the whole keyspace is swept as an operator (SCAN, every key's DUMP): no user id appears
in a key or a value. As the relay's own Redis user, every way of writing Redis' memory to
a file is refused, and no file appears under Redis' directory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc

from tests.support.redis import RedisServer, prefix, relay_env
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client


@pytest.fixture
def relay_on_redis(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Stack, str]]:
    key_prefix = prefix()
    stack = Stack(
        tmp_path,
        ("identity", "session", "relay"),
        extra_env={"relay": relay_env(redis_server, key_prefix)},
    )
    stack.start()
    yield stack, key_prefix
    stack.stop()


def keyspace(server: RedisServer, key_prefix: str) -> list[tuple[bytes, bytes]]:
    """Every key under `key_prefix` with its serialized value (DUMP), as an operator."""
    with server.admin() as admin:
        return [
            (key, admin.dump(key) or b"")
            for key in admin.scan_iter(match=f"{key_prefix}*", count=1000)
        ]


def test_under_load_redis_holds_no_user_id_and_nothing_reaches_disk(
    relay_on_redis: tuple[Stack, str], redis_server: RedisServer
) -> None:
    stack, key_prefix = relay_on_redis
    client = user_client(stack)
    suffix = secrets.token_hex(4)
    names = [f"{who}-{suffix}" for who in ("alice", "bob", "carol")]
    people = {}
    for name in names:
        keys = new_user(client, name)
        people[name] = (client.login(name, keys), pb_grpc.RelayServiceStub(stack.channel("relay")))
    bodies = []
    for round_ in range(30):
        for sender in names:
            for recipient in names:
                if sender != recipient:
                    token, relay = people[sender]
                    body = secrets.token_bytes(200) + f"{round_}".encode()
                    bodies.append(body)
                    relay.SendMessage(
                        pb.SendMessageRequest(
                            recipient_id=recipient, body=body, client_message_id=f"c{round_}"
                        ),
                        metadata=bearer(token),
                        timeout=10,
                    )
    token, relay = people[names[0]]
    read = relay.FetchMessages(pb.FetchMessagesRequest(max_messages=10), metadata=bearer(token))
    assert len(read.messages) == 10
    assert {m.sender_id for m in read.messages} <= set(names)
    relay.AcknowledgeMessages(
        pb.AcknowledgeMessagesRequest(message_ids=[m.message_id for m in read.messages[:5]]),
        metadata=bearer(token),
    )
    client.close()

    dump = keyspace(redis_server, key_prefix)
    memory = b"\n".join(key + b"\n" + value for key, value in dump)
    assert sum(body in memory for body in bodies) == len(bodies) - 5  # the sweep sees data
    for name in names:
        assert name.encode() not in memory, f"{name} is readable in Redis"
        assert name.encode().hex().encode() not in memory

    relay_user = redis.Redis.from_url(redis_server.url("relay"), socket_timeout=10)
    with relay_user:
        for command in (
            ("BGSAVE",),
            ("SAVE",),
            ("CONFIG", "SET", "dir", "/tmp"),
            ("CONFIG", "SET", "save", "1 1"),
            ("CONFIG", "SET", "appendonly", "yes"),
            ("BGREWRITEAOF",),
            ("DEBUG", "RELOAD"),
            ("FLUSHALL",),
            ("MODULE", "LIST"),
            ("ACL", "SETUSER", "relay", "+@all"),
        ):
            # NOPERM for the relay's user; DEBUG and MODULE are off for everyone.
            with pytest.raises(redis.exceptions.ResponseError, match=r"no permissions|not allowed"):
                relay_user.execute_command(*command)  # type: ignore[no-untyped-call]
    if redis_server.private:
        assert redis_server.files() == []
        with redis_server.admin() as admin:
            assert admin.config_get("save") == {"save": ""}
            assert admin.config_get("appendonly") == {"appendonly": "no"}
            assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert admin.config_get("repl-diskless-sync") == {"repl-diskless-sync": "yes"}
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(port=redis_server.port, socket_timeout=10).ping()  # default: off
