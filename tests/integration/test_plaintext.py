"""Explicit plaintext development mode: no TLS anywhere, internal APIs for loopback only."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from securemsg.audit.v1 import audit_service_pb2 as audit_pb
from securemsg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb
from securemsg.session.v1 import session_service_pb2_grpc as session_grpc

from services.client.keys import UserKeys
from tests.support.stack import Stack
from tests.support.users import registration

PLAINTEXT = {"INSECURE_PLAINTEXT": "true"}


def plaintext_stack(tmp_path: Path, services: tuple[str, ...]) -> Stack:
    stack = Stack(tmp_path, services, extra_env={name: PLAINTEXT for name in services})
    for service in stack.services.values():
        service.ca_file = None  # health checks in plaintext too
        for variable in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE"):
            del service.env[variable]
    return stack


def test_services_work_without_tls_only_when_asked_and_keep_internal_apis_local(
    tmp_path: Path,
) -> None:
    stack = plaintext_stack(tmp_path, ("identity", "session"))
    stack.start()
    try:
        identity_address = stack["identity"].env["LISTEN_ADDRESS"]
        with grpc.insecure_channel(identity_address) as channel:
            keys = UserKeys.generate(1)
            identity_grpc.IdentityServiceStub(channel).RegisterUser(
                registration("plain-user", keys), timeout=10
            )
        with grpc.insecure_channel(stack["session"].env["LISTEN_ADDRESS"]) as channel:
            sessions = session_grpc.SessionServiceStub(channel)
            challenge = sessions.CreateChallenge(
                session_pb.CreateChallengeRequest(user_id="plain-user"), timeout=10
            )
            token = sessions.CreateSession(
                session_pb.CreateSessionRequest(
                    user_id="plain-user",
                    challenge_id=challenge.challenge_id,
                    signature=keys.sign_login("plain-user", challenge.challenge),
                ),
                timeout=10,
            ).token
        assert len(token) == 43
        # The internal API answers a loopback caller without any certificate.
        with grpc.insecure_channel(stack["identity"].env["INTERNAL_LISTEN_ADDRESS"]) as channel:
            reply = internal_grpc.IdentityInternalServiceStub(channel).GetVerifyKey(
                internal_pb.GetVerifyKeyRequest(user_id="plain-user"), timeout=10
            )
        assert reply.verify_key == keys.verify_key
    finally:
        stack.stop()


def test_without_tls_material_or_the_explicit_flag_a_service_refuses(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity",))
    identity = stack["identity"]
    del identity.env["TLS_CERT_FILE"]
    code, output = identity.run_to_exit()
    assert code == 2
    assert "TLS_CERT_FILE not set" in output
    assert "INSECURE_PLAINTEXT=true" in output


@pytest.mark.parametrize("flag", ["yes please", "2"])
def test_a_malformed_flag_is_refused(tmp_path: Path, flag: str) -> None:
    stack = Stack(tmp_path, ("identity",))
    identity = stack["identity"]
    identity.env["INSECURE_PLAINTEXT"] = flag
    code, output = identity.run_to_exit()
    assert code == 2
    assert "INSECURE_PLAINTEXT must be true or false" in output


def test_plaintext_audit_never_takes_a_loopback_peer_on_the_public_port_for_the_operator(
    tmp_path: Path,
) -> None:
    stack = plaintext_stack(tmp_path, ("session", "audit"))
    stack.start()
    try:
        request = audit_pb.ListAuditEventsRequest()
        with grpc.insecure_channel(stack["audit"].env["LISTEN_ADDRESS"]) as channel:
            with pytest.raises(grpc.RpcError) as error:
                audit_grpc.AuditServiceStub(channel).ListAuditEvents(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(stack["audit"].env["INTERNAL_LISTEN_ADDRESS"]) as channel:
            audit_grpc.AuditServiceStub(channel).ListAuditEvents(request, timeout=10)
    finally:
        stack.stop()


def test_plaintext_mode_refuses_a_public_bind(tmp_path: Path) -> None:
    stack = plaintext_stack(tmp_path, ("identity",))
    stack["identity"].env["LISTEN_ADDRESS"] = "0.0.0.0:0"
    code, output = stack["identity"].run_to_exit()
    assert code == 2
    assert "LISTEN_ADDRESS=0.0.0.0:0 is not a loopback address" in output
