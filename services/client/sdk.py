"""A small synchronous client for the SecureMsg services, used by the CLI.

It speaks only the public protos and `services.protocol`; every call carries a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
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

Request = TypeVar("Request", bound=Message)
Reply = TypeVar("Reply", bound=Message)


@dataclass(frozen=True)
class Endpoints:
    """Where the services listen and how to trust them."""

    ca_file: Path | None  # None: plaintext (development only)
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    # Operator APIs: the default internal ports unless given (a stack on other ports).
    internal_ports: dict[str, int] = field(
        default_factory=lambda: {name: internal_port(name) for name in DEFAULT_PORTS}
    )

    def channel(self, service: str, *, client_cert: Path | None = None) -> grpc.Channel:
        """A channel to the public port, or with a client certificate to the internal one."""
        port = self.ports[service] if client_cert is None else self.internal_ports[service]
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


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds to wait from a RESOURCE_EXHAUSTED error's google.rpc.RetryInfo, if any."""
    if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a rich status that does not match the call's: not ours to trust
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def registration_request(
    user_id: str, alias: str, keys: UserKeys, metadata: Mapping[str, str] | None = None
) -> identity_pb.RegisterUserRequest:
    """What RegisterUser needs: the public halves of `keys`, signed by the verify key."""
    return identity_pb.RegisterUserRequest(
        user_id=user_id,
        alias=alias,
        metadata=dict(metadata or {}),
        identity_key=keys.identity_public,
        verify_key=keys.verify_key,
        signed_prekey=keys.signed_prekey_proto(),
        pq_prekey=keys.pq_prekey_proto(),
        one_time_prekeys=keys.one_time_protos(),
    )


class UserClient:
    """What one end user does: register, log in, look up peers, manage sessions.

    Rate limits answer RESOURCE_EXHAUSTED with the wait in a RetryInfo detail. A client
    made with `max_wait_when_limited` waits that long at most and tries once more
    (calling `on_wait` first, e.g. to tell the user); by default it raises at once.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        max_wait_when_limited: float = 0.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._channels = [endpoints.channel(name) for name in ("identity", "session", "relay")]
        self.identity = identity_grpc.IdentityServiceStub(self._channels[0])
        self.session = session_grpc.SessionServiceStub(self._channels[1])
        self.relay = relay_grpc.RelayServiceStub(self._channels[2])
        self._max_wait = max_wait_when_limited
        self._on_wait = on_wait

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> UserClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Reply],
        request: Request,
        token: str | None = None,
    ) -> Reply:
        """One unary call with a deadline; once more after a short rate-limit wait.

        Retrying is safe: RESOURCE_EXHAUSTED means the server did nothing.
        """
        metadata = _bearer(token) if token is not None else None
        try:
            return method(request, metadata=metadata, timeout=DEADLINE_SECONDS)
        except grpc.RpcError as exc:
            delay = retry_delay(exc)
            if delay is None or delay > self._max_wait:
                raise
        if self._on_wait is not None:
            self._on_wait(delay)
        time.sleep(delay)
        return method(request, metadata=metadata, timeout=DEADLINE_SECONDS)

    def register(
        self,
        user_id: str,
        alias: str,
        keys: UserKeys,
        metadata: Mapping[str, str] | None = None,
    ) -> identity_pb.Profile:
        request = registration_request(user_id, alias, keys, metadata)
        return self._call(self.identity.RegisterUser, request).profile

    def login(self, user_id: str, keys: UserKeys, user_agent: str = "securemsg-cli") -> str:
        return self.login_session(user_id, keys, user_agent).token

    def login_session(
        self, user_id: str, keys: UserKeys, user_agent: str = "securemsg-cli"
    ) -> session_pb.CreateSessionResponse:
        """Logs in; the reply's session says whether it must step up (its scope)."""
        challenge = self._call(
            self.session.CreateChallenge, session_pb.CreateChallengeRequest(user_id=user_id)
        )
        return self._call(
            self.session.CreateSession,
            session_pb.CreateSessionRequest(
                user_id=user_id,
                challenge_id=challenge.challenge_id,
                signature=keys.sign_login(user_id, challenge.challenge),
                user_agent=user_agent,
            ),
        )

    # Account security: second factor, recovery codes, password, recovery.

    def step_up(self, token: str, code: str = "", recovery_code: str = "") -> session_pb2.Session:
        """Proves a TOTP code or a recovery code in the session (see StepUpSession)."""
        request = session_pb.StepUpSessionRequest(code=code, recovery_code=recovery_code)
        return self._call(self.session.StepUpSession, request, token).session

    def step_up_with_key(self, token: str, user_id: str, keys: UserKeys) -> session_pb2.Session:
        """Re-proves the device key (accounts without a second factor)."""
        challenge = self._call(
            self.session.CreateChallenge, session_pb.CreateChallengeRequest(user_id=user_id)
        )
        request = session_pb.StepUpSessionRequest(
            challenge_id=challenge.challenge_id,
            signature=keys.sign_login(user_id, challenge.challenge),
        )
        return self._call(self.session.StepUpSession, request, token).session

    def begin_totp(self, token: str) -> identity_pb.BeginTotpEnrollmentResponse:
        request = identity_pb.BeginTotpEnrollmentRequest()
        return self._call(self.identity.BeginTotpEnrollment, request, token)

    def activate_totp(self, token: str, code: str) -> list[str]:
        """Activates the pending TOTP factor; returns the recovery codes (shown once)."""
        request = identity_pb.ActivateTotpRequest(code=code)
        return list(self._call(self.identity.ActivateTotp, request, token).recovery_codes)

    def remove_totp(self, token: str, code: str = "", recovery_code: str = "") -> None:
        request = identity_pb.RemoveTotpRequest(code=code, recovery_code=recovery_code)
        self._call(self.identity.RemoveTotp, request, token)

    def regenerate_recovery_codes(self, token: str) -> list[str]:
        request = identity_pb.RegenerateRecoveryCodesRequest()
        return list(
            self._call(self.identity.RegenerateRecoveryCodes, request, token).recovery_codes
        )

    def set_password(self, token: str, password: str) -> None:
        request = identity_pb.SetPasswordRequest(password=password)
        self._call(self.identity.SetPassword, request, token)

    def password_session(
        self, user_id: str, password: str, code: str = "", recovery_code: str = ""
    ) -> session_pb.CreatePasswordSessionResponse:
        """A recovery session from the password (and a code, if the account has one)."""
        request = session_pb.CreatePasswordSessionRequest(
            user_id=user_id,
            password=password,
            second_factor_code=code,
            recovery_code=recovery_code,
            user_agent="securemsg-cli recovery",
        )
        return self._call(self.session.CreatePasswordSession, request)

    def replace_keys(self, token: str, keys: UserKeys) -> identity_pb.ReplaceAccountKeysResponse:
        """Replaces the account's keys with `keys` (signed by its new verify key)."""
        request = identity_pb.ReplaceAccountKeysRequest(
            identity_key=keys.identity_public,
            verify_key=keys.verify_key,
            signed_prekey=keys.signed_prekey_proto(),
            pq_prekey=keys.pq_prekey_proto(),
            one_time_prekeys=keys.one_time_protos(),
        )
        return self._call(self.identity.ReplaceAccountKeys, request, token)

    def deactivate(self, token: str) -> None:
        self._call(self.identity.DeactivateAccount, identity_pb.DeactivateAccountRequest(), token)

    def profile(self, token: str) -> identity_pb.Profile:
        return self._call(
            self.identity.GetOwnProfile, identity_pb.GetOwnProfileRequest(), token
        ).profile

    def bundle(self, token: str, user_id: str) -> keys_pb2.KeyBundle:
        return self._call(
            self.identity.GetKeyBundle, identity_pb.GetKeyBundleRequest(user_id=user_id), token
        ).bundle

    def upload_prekeys(self, token: str, prekeys: list[keys_pb2.OneTimePrekey]) -> int:
        return self._call(
            self.identity.UploadOneTimePrekeys,
            identity_pb.UploadOneTimePrekeysRequest(one_time_prekeys=prekeys),
            token,
        ).one_time_prekey_count

    def sessions(self, token: str, page_size: int = 0) -> list[session_pb2.Session]:
        """Every live session of the caller, newest first, following the pages."""
        sessions: list[session_pb2.Session] = []
        page_token = ""
        while True:
            request = session_pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
            page = self._call(self.session.ListSessions, request, token)
            sessions.extend(page.sessions)
            page_token = page.next_page_token
            if not page_token:
                return sessions

    def logout(self, token: str) -> None:
        self._call(self.session.DeleteSession, session_pb.DeleteSessionRequest(), token)

    def send(self, token: str, recipient_id: str, body: bytes) -> str:
        return self._call(
            self.relay.SendMessage,
            relay_pb.SendMessageRequest(recipient_id=recipient_id, body=body),
            token,
        ).message_id

    def fetch(self, token: str) -> list[relay_pb.Envelope]:
        return list(
            self._call(self.relay.FetchMessages, relay_pb.FetchMessagesRequest(), token).messages
        )

    def acknowledge(self, token: str, message_ids: list[str]) -> int:
        return self._call(
            self.relay.AcknowledgeMessages,
            relay_pb.AcknowledgeMessagesRequest(message_ids=message_ids),
            token,
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
