"""Acting as a client: registering users and logging in through the generated stubs."""

from __future__ import annotations

import grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb
from securemsg.session.v1 import session_service_pb2_grpc as session_grpc

from services.client.keys import UserKeys
from tests.support.stack import Stack


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def registration(
    user_id: str, keys: UserKeys, *, alias: str = "", **overrides: object
) -> identity_pb.RegisterUserRequest:
    fields: dict[str, object] = {
        "user_id": user_id,
        "alias": alias or f"Alias of {user_id}",
        "metadata": {"device": "test-phone"},
        "identity_key": keys.identity_public,
        "verify_key": keys.verify_key,
        "signed_prekey": keys.signed_prekey_proto(),
        "pq_prekey": keys.pq_prekey_proto(),
        "one_time_prekeys": keys.one_time_protos(),
    }
    fields.update(overrides)
    return identity_pb.RegisterUserRequest(**fields)  # type: ignore[arg-type]


class Client:
    """One end user's view of the stack, over TLS without a client certificate."""

    def __init__(self, stack: Stack) -> None:
        self._identity_channel = stack.channel("identity")
        self._session_channel = stack.channel("session")
        self.identity = identity_grpc.IdentityServiceStub(self._identity_channel)
        self.session = session_grpc.SessionServiceStub(self._session_channel)

    def close(self) -> None:
        self._identity_channel.close()
        self._session_channel.close()

    def register(
        self, user_id: str, *, one_time: int = 10, alias: str = "", **overrides: object
    ) -> UserKeys:
        keys = UserKeys.generate(one_time)
        request = registration(user_id, keys, alias=alias, **overrides)
        self.identity.RegisterUser(request, timeout=10)
        return keys

    def login(self, user_id: str, keys: UserKeys, user_agent: str = "pytest") -> str:
        challenge = self.session.CreateChallenge(
            session_pb.CreateChallengeRequest(user_id=user_id), timeout=10
        )
        reply = self.session.CreateSession(
            session_pb.CreateSessionRequest(
                user_id=user_id,
                challenge_id=challenge.challenge_id,
                signature=keys.sign_login(user_id, challenge.challenge),
                user_agent=user_agent,
            ),
            timeout=10,
        )
        return reply.token

    def profile(self, token: str) -> identity_pb.Profile:
        return self.identity.GetOwnProfile(
            identity_pb.GetOwnProfileRequest(), metadata=bearer(token), timeout=10
        ).profile


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call (what a person would read)."""
    return str(error.details() or "")


def validate(stack: Stack, token: str) -> internal_pb.ValidateSessionResponse:
    """Checks a token the way the other services do (relay's certificate)."""
    with stack.channel("session", cert="relay") as channel:
        stub = internal_grpc.SessionInternalServiceStub(channel)
        return stub.ValidateSession(internal_pb.ValidateSessionRequest(token=token), timeout=10)
