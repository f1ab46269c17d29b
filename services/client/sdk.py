"""A small synchronous client for the SecureMsg services, used by the CLI.

It speaks only the public protos; every call carries a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.identity.v1 import keys_pb2
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc
from securemsg.session.v1 import session_pb2
from securemsg.session.v1 import session_service_pb2 as session_pb
from securemsg.session.v1 import session_service_pb2_grpc as session_grpc

from services.client.keys import UserKeys
from services.protocol.ports import DEFAULT_PORTS, internal_port

DEADLINE_SECONDS = 10.0


@dataclass(frozen=True)
class Endpoints:
    """Where the services listen and how to trust them."""

    ca_file: Path | None  # None: plaintext (development only)
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))

    def channel(self, service: str, *, client_cert: Path | None = None) -> grpc.Channel:
        """A channel to the public port, or with a client certificate to the internal one."""
        port = self.ports[service] if client_cert is None else internal_port(service)
        address = f"{self.host}:{port}"
        if self.ca_file is None:
            return grpc.insecure_channel(address)
        ca = self.ca_file.read_bytes()
        if client_cert is None:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
        key = client_cert.with_suffix(".key").read_bytes()
        credentials = grpc.ssl_channel_credentials(ca, key, client_cert.read_bytes())
        return grpc.secure_channel(address, credentials)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class UserClient:
    """What one end user does: register, log in, look up peers, manage sessions."""

    def __init__(self, endpoints: Endpoints) -> None:
        self._channels = [endpoints.channel(name) for name in ("identity", "session", "relay")]
        self.identity = identity_grpc.IdentityServiceStub(self._channels[0])
        self.session = session_grpc.SessionServiceStub(self._channels[1])
        self.relay = relay_grpc.RelayServiceStub(self._channels[2])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> UserClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def register(self, user_id: str, alias: str, keys: UserKeys) -> identity_pb.Profile:
        request = identity_pb.RegisterUserRequest(
            user_id=user_id,
            alias=alias,
            identity_key=keys.identity_public,
            verify_key=keys.verify_key,
            signed_prekey=keys.signed_prekey_proto(),
            pq_prekey=keys.pq_prekey_proto(),
            one_time_prekeys=keys.one_time_protos(),
        )
        return self.identity.RegisterUser(request, timeout=DEADLINE_SECONDS).profile

    def login(self, user_id: str, keys: UserKeys, user_agent: str = "securemsg-cli") -> str:
        challenge = self.session.CreateChallenge(
            session_pb.CreateChallengeRequest(user_id=user_id), timeout=DEADLINE_SECONDS
        )
        reply = self.session.CreateSession(
            session_pb.CreateSessionRequest(
                user_id=user_id,
                challenge_id=challenge.challenge_id,
                signature=keys.sign_login(user_id, challenge.challenge),
                user_agent=user_agent,
            ),
            timeout=DEADLINE_SECONDS,
        )
        return reply.token

    def profile(self, token: str) -> identity_pb.Profile:
        return self.identity.GetOwnProfile(
            identity_pb.GetOwnProfileRequest(), metadata=_bearer(token), timeout=DEADLINE_SECONDS
        ).profile

    def bundle(self, token: str, user_id: str) -> keys_pb2.KeyBundle:
        return self.identity.GetKeyBundle(
            identity_pb.GetKeyBundleRequest(user_id=user_id),
            metadata=_bearer(token),
            timeout=DEADLINE_SECONDS,
        ).bundle

    def upload_prekeys(self, token: str, prekeys: list[keys_pb2.OneTimePrekey]) -> int:
        return self.identity.UploadOneTimePrekeys(
            identity_pb.UploadOneTimePrekeysRequest(one_time_prekeys=prekeys),
            metadata=_bearer(token),
            timeout=DEADLINE_SECONDS,
        ).one_time_prekey_count

    def sessions(self, token: str) -> list[session_pb2.Session]:
        return list(
            self.session.ListSessions(
                session_pb.ListSessionsRequest(), metadata=_bearer(token), timeout=DEADLINE_SECONDS
            ).sessions
        )

    def logout(self, token: str) -> None:
        self.session.DeleteSession(
            session_pb.DeleteSessionRequest(), metadata=_bearer(token), timeout=DEADLINE_SECONDS
        )

    def send(self, token: str, recipient_id: str, body: bytes) -> str:
        return self.relay.SendMessage(
            relay_pb.SendMessageRequest(recipient_id=recipient_id, body=body),
            metadata=_bearer(token),
            timeout=DEADLINE_SECONDS,
        ).message_id

    def fetch(self, token: str) -> list[relay_pb.Envelope]:
        return list(
            self.relay.FetchMessages(
                relay_pb.FetchMessagesRequest(), metadata=_bearer(token), timeout=DEADLINE_SECONDS
            ).messages
        )

    def acknowledge(self, token: str, message_ids: list[str]) -> int:
        return self.relay.AcknowledgeMessages(
            relay_pb.AcknowledgeMessagesRequest(message_ids=message_ids),
            metadata=_bearer(token),
            timeout=DEADLINE_SECONDS,
        ).acknowledged_count

    def follow(self, token: str, seconds: float) -> Iterator[relay_pb.Envelope]:
        """Live messages for up to `seconds` (the stream's deadline)."""
        stream = self.relay.SubscribeMessages(
            relay_pb.SubscribeMessagesRequest(), metadata=_bearer(token), timeout=seconds
        )
        try:
            for item in stream:
                yield item.message
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
