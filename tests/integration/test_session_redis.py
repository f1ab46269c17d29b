"""The session service with its login state in Redis (REDIS_URL): real processes."""

from __future__ import annotations

from pathlib import Path

from securemsg.session.v1 import session_service_pb2 as session_pb

from tests.support.redis import RedisServer, prefix
from tests.support.stack import Stack
from tests.support.users import new_user, user_client


def test_logins_go_through_challenges_kept_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key_prefix = prefix()
    stack = Stack(
        tmp_path,
        extra_env={
            "session": {"REDIS_URL": redis_server.url("session"), "REDIS_KEY_PREFIX": key_prefix}
        },
    )
    stack.start()
    try:
        client = user_client(stack)
        keys = new_user(client, "alice")
        assert client.login("alice", keys)
        client.session.CreateChallenge(session_pb.CreateChallengeRequest(user_id="alice"))
        with redis_server.admin() as admin:
            found = list(admin.scan_iter(match=f"{key_prefix}*", count=1000))
        assert any(b":ch:" in key for key in found)  # the pending challenge
        assert any(b":rl:login_challenges:" in key for key in found)  # its rate window
        client.close()
    finally:
        stack.stop()
