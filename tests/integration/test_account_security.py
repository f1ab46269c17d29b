"""Second factor, recovery codes, assurance levels, password recovery: each promise of
issue 17's "Done when", against real identity, session, relay and audit processes over
TLS, with real SQLite files and real crypto.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import argon2
import argon2.exceptions
import grpc
import pyotp
import pytest
from securemsg.identity.v1 import identity_service_pb2 as id_pb
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc
from securemsg.session.v1 import session_pb2
from securemsg.session.v1 import session_service_pb2 as pb

from services.cli.__main__ import _parser, _run
from services.client.keys import UserKeys
from services.client.sdk import UserClient
from tests.support.audit import operator_list
from tests.support.stack import Stack, scrape_metrics
from tests.support.users import bearer, details, endpoints, new_user, user_client, validate

PASSWORD = "lantern orbit velvet quarry"
STEP = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("mfa"),
        ("identity", "session", "relay", "audit"),
        extra_env={
            "identity": {"PASSWORD_BUDGET": "4"},
            # The per-(account, address) bound has its own unit test (one address here).
            "session": {"PASSWORD_LOGIN_FAILURES_PER_ACCOUNT_ADDRESS": "100"},
        },
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[UserClient]:
    client = user_client(stack)
    yield client
    client.close()


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def wrong_code(secret: str) -> str:
    """A six-digit code the server would not accept now."""
    valid = {pyotp.TOTP(secret).at(time.time() + d * STEP) for d in (-2, -1, 0, 1, 2)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


def wait_for_actions(stack: Stack, user_id: str, expected: set[str]) -> set[str]:
    """The user's audit actions once `expected` have all been shipped (or 20 s passed)."""
    deadline = time.monotonic() + 20
    while True:
        actions = {e.action for e in operator_list(stack, user_id=user_id)}
        if expected <= actions or time.monotonic() > deadline:
            return actions
        time.sleep(0.3)


class Account:
    """One user driving the public APIs as a client app would."""

    def __init__(self, client: UserClient, user_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self.keys = new_user(client, user_id)
        self.secret = ""
        self.recovery_codes: list[str] = []
        self.used_step = 0  # codes are accepted once per step: use each step once

    def login(self, keys: UserKeys | None = None) -> str:
        return self.client.login(self.user_id, keys or self.keys)

    def next_code(self) -> str:
        """A code the server accepts: each time step once, one step of skew either way,
        so three codes are at hand at once and a fourth waits for the clock."""
        self.used_step = max(self.used_step + 1, int(time.time() // STEP) - 1)
        wait = (self.used_step - 1) * STEP - time.time()
        if wait > 0:
            time.sleep(wait + 0.5)
        return str(pyotp.TOTP(self.secret).at(self.used_step * STEP))

    def step_up(self, token: str, **proof: Any) -> session_pb2.Session:
        reply: pb.StepUpSessionResponse = self.client.session.StepUpSession(
            pb.StepUpSessionRequest(**proof), metadata=bearer(token), timeout=10
        )
        return reply.session

    def enrol(self, token: str) -> None:
        begun = self.client.identity.BeginTotpEnrollment(
            id_pb.BeginTotpEnrollmentRequest(), metadata=bearer(token), timeout=10
        )
        assert begun.otpauth_uri.startswith(f"otpauth://totp/SecureMsg:{self.user_id}?")
        self.secret = begun.secret
        self.used_step = int(time.time() // STEP) - 2
        activated = self.client.identity.ActivateTotp(
            id_pb.ActivateTotpRequest(code=self.next_code()), metadata=bearer(token), timeout=10
        )
        self.recovery_codes = list(activated.recovery_codes)

    def set_password(self, token: str, password: str = PASSWORD) -> None:
        self.client.identity.SetPassword(
            id_pb.SetPasswordRequest(password=password), metadata=bearer(token), timeout=10
        )

    def password_login(self, password: str = PASSWORD, **factor: str) -> str:
        reply: pb.CreatePasswordSessionResponse = self.client.session.CreatePasswordSession(
            pb.CreatePasswordSessionRequest(user_id=self.user_id, password=password, **factor),
            timeout=10,
        )
        return reply.token


def test_an_enrolled_account_cannot_act_beyond_step_up_without_a_code(
    stack: Stack, client: UserClient
) -> None:
    alice = Account(client, "alice-mfa")
    alice.enrol(alice.login())
    assert len(alice.recovery_codes) == 10

    token = alice.login()
    denied = refused(lambda: client.profile(token))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "StepUpSession" in details(denied)
    listing = refused(
        lambda: client.session.ListSessions(pb.ListSessionsRequest(), metadata=bearer(token))
    )
    assert listing.code() == grpc.StatusCode.PERMISSION_DENIED
    # Other services ask ValidateSession, which refuses restricted sessions by default.
    assert refused(lambda: validate(stack, token)).code() == grpc.StatusCode.PERMISSION_DENIED
    with stack.channel("relay") as channel:
        relay = relay_grpc.RelayServiceStub(channel)
        send = refused(
            lambda: relay.SendMessage(
                relay_pb.SendMessageRequest(recipient_id="alice-mfa", body=b"x"),
                metadata=bearer(token),
                timeout=10,
            )
        )
    assert send.code() == grpc.StatusCode.PERMISSION_DENIED
    bad = refused(lambda: alice.step_up(token, code=wrong_code(alice.secret)))
    assert bad.code() == grpc.StatusCode.UNAUTHENTICATED

    session = alice.step_up(token, code=alice.next_code())
    assert session.assurance_level == session_pb2.ASSURANCE_LEVEL_DEVICE_KEY_AND_SECOND_FACTOR
    assert session.scope == session_pb2.SESSION_SCOPE_FULL
    profile = client.profile(token)
    assert (profile.second_factor_enabled, profile.recovery_codes_remaining) == (True, 10)
    checked = validate(stack, token)
    assert checked.assurance_level == session_pb2.ASSURANCE_LEVEL_DEVICE_KEY_AND_SECOND_FACTOR
    assert checked.HasField("step_up_expire_time")


def test_a_code_works_once(client: UserClient) -> None:
    bob = Account(client, "bob-mfa")
    bob.enrol(bob.login())
    first, second = bob.login(), bob.login()
    code = bob.next_code()
    bob.step_up(first, code=code)
    reused = refused(lambda: bob.step_up(second, code=code))
    assert reused.code() == grpc.StatusCode.UNAUTHENTICATED


def test_recovery_codes_work_once_each(client: UserClient) -> None:
    carol = Account(client, "carol-mfa")
    carol.enrol(carol.login())
    tokens = [carol.login() for _ in range(3)]
    carol.step_up(tokens[0], recovery_code=carol.recovery_codes[0])
    carol.step_up(tokens[1], recovery_code=carol.recovery_codes[1].lower())
    again = refused(lambda: carol.step_up(tokens[2], recovery_code=carol.recovery_codes[0]))
    assert again.code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.profile(tokens[0]).recovery_codes_remaining == 8
    # A new set replaces the old one.
    fresh = client.identity.RegenerateRecoveryCodes(
        id_pb.RegenerateRecoveryCodesRequest(), metadata=bearer(tokens[0]), timeout=10
    ).recovery_codes
    old = refused(lambda: carol.step_up(tokens[2], recovery_code=carol.recovery_codes[2]))
    assert old.code() == grpc.StatusCode.UNAUTHENTICATED
    carol.step_up(tokens[2], recovery_code=fresh[0])


@pytest.mark.sqlite_only
def test_a_stolen_database_shows_no_totp_secret_and_nothing_to_test_a_password_against(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path)
    stack.start()
    try:
        client = user_client(stack)
        dave = Account(client, "dave-mfa")
        token = dave.login()
        dave.set_password(token)
        dave.enrol(token)
        client.close()
    finally:
        stack.stop()  # checkpoints the WAL: everything is in the main file
    raw = b"".join(p.read_bytes() for p in stack.layout.data.glob("identity.db*") if p.is_file())
    secret_bytes = base64.b32decode(dave.secret)
    for needle in [
        dave.secret.encode(),
        dave.secret.lower().encode(),
        secret_bytes,
        PASSWORD.encode(),
        b"$argon2",
        *(code.encode() for code in dave.recovery_codes),
        *(code.replace("-", "").encode() for code in dave.recovery_codes),
        # Not even unkeyed hashes a thief could match codes against.
        *(hashlib.sha256(code.replace("-", "").encode()).digest() for code in dave.recovery_codes),
    ]:
        assert needle not in raw, needle
    # No stored value is an Argon2 hash the password can be checked against.
    with sqlite3.connect(stack.db_path("identity")) as conn:
        blobs = [
            value
            for row in conn.execute("SELECT * FROM factors")
            for value in row
            if isinstance(value, bytes)
        ]
    assert blobs
    for blob in blobs:
        with pytest.raises((argon2.exceptions.InvalidHashError, UnicodeDecodeError, ValueError)):
            argon2.PasswordHasher().verify(blob.decode(), PASSWORD)


def _edit_factors(stack: Stack, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What someone with write access to identity's database but no master key can do,
    with the service stopped (SQLite file or PostgreSQL database, whichever it runs on)."""
    stack["identity"].stop()
    try:
        with stack.raw_database("identity") as db:
            for sql, params in statements:
                db.execute(sql, params)
    finally:
        stack["identity"].start()


def _newest_user_row(stack: Stack) -> int:
    with stack.raw_database("identity") as db:
        return int(db.execute("SELECT max(id) FROM users").fetchone()[0])


FACTOR_EDITS = {  # the README's attacks on the factors table, each on the victim's row
    "second factor removed": "UPDATE factors SET totp_secret_ct = NULL WHERE user_row = ?",
    "password removed": "UPDATE factors SET password_ct = NULL WHERE user_row = ?",
    "TOTP step rewound": "UPDATE factors SET totp_last_step = 0 WHERE user_row = ?",
    "password budget reset": "UPDATE factors SET password_failures = 0,"
    " password_window_start = NULL WHERE user_row = ?",
    "whole row deleted": "DELETE FROM factors WHERE user_row = ?",
    "recovery code deleted": "DELETE FROM recovery_codes WHERE digest ="
    " (SELECT digest FROM recovery_codes WHERE user_row = ? ORDER BY digest LIMIT 1)",
}


@pytest.mark.parametrize("attack", list(FACTOR_EDITS))
def test_a_factors_row_edited_in_the_database_is_an_integrity_error(
    stack: Stack, client: UserClient, attack: str
) -> None:
    victim = Account(client, f"vic-{attack.lower().replace(' ', '-')}")
    user_row = _newest_user_row(stack)
    token = victim.login()
    victim.set_password(token)
    victim.enrol(token)
    with pytest.raises(grpc.RpcError):  # one failure counts against the budget
        victim.password_login("not the password", second_factor_code=victim.next_code())
    _edit_factors(stack, (FACTOR_EDITS[attack], (user_row,)))

    profile = refused(lambda: client.profile(token))
    assert profile.code() == grpc.StatusCode.DATA_LOSS
    assert "integrity" in details(profile)
    # No login trusts the row: not the password alone, not the device key (whose login
    # reads whether the account has a second factor).
    assert refused(lambda: victim.password_login()).code() != grpc.StatusCode.OK
    assert refused(lambda: victim.login()).code() != grpc.StatusCode.OK
    metrics = scrape_metrics(stack, "identity")
    counted = r'securemsg_integrity_failures_total\{field="identity\.row/factors"\} [1-9]'
    assert re.search(counted, metrics)
    log = stack["identity"].log()
    assert "integrity failure" in log
    assert victim.user_id not in log


def test_a_factors_row_moved_to_another_account_does_not_log_in_with_its_password(
    stack: Stack, client: UserClient
) -> None:
    # The attacker knows their own password, moves their factors row onto the victim's
    # account (whose own row is deleted) and logs in as the victim with it.
    victim = Account(client, "victim-moved-row")
    victim_row = _newest_user_row(stack)
    token = victim.login()
    victim.set_password(token, "the victims own long password")
    attacker = Account(client, "attacker-moved-row")
    attacker_row = _newest_user_row(stack)
    attacker.set_password(attacker.login())
    _edit_factors(
        stack,
        ("DELETE FROM factors WHERE user_row = ?", (victim_row,)),
        ("UPDATE factors SET user_row = ? WHERE user_row = ?", (victim_row, attacker_row)),
    )
    moved = refused(lambda: victim.password_login(PASSWORD))
    assert moved.code() != grpc.StatusCode.OK
    profile = refused(lambda: client.profile(token))
    assert profile.code() == grpc.StatusCode.DATA_LOSS


def test_a_lost_device_is_recovered_by_password_and_code(stack: Stack, client: UserClient) -> None:
    erin = Account(client, "erin-mfa")
    token = erin.login()
    erin.set_password(token)
    erin.enrol(token)
    other = erin.login()
    erin.step_up(other, code=erin.next_code())

    # The device is gone. Password alone is not enough for an account with a code.
    missing = refused(lambda: erin.password_login())
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    recovery = erin.password_login(second_factor_code=erin.next_code())
    denied = refused(lambda: client.profile(recovery))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "recovery session" in details(denied)

    new_keys = UserKeys.generate(5)
    replaced = client.identity.ReplaceAccountKeys(
        id_pb.ReplaceAccountKeysRequest(
            identity_key=new_keys.identity_public,
            verify_key=new_keys.verify_key,
            signed_prekey=new_keys.signed_prekey_proto(),
            pq_prekey=new_keys.pq_prekey_proto(),
            one_time_prekeys=new_keys.one_time_protos(),
        ),
        metadata=bearer(recovery),
        timeout=10,
    )
    assert replaced.revoked_session_count == 2  # every session but the recovery one
    assert replaced.profile.one_time_prekey_count == 5  # the old ones were discarded

    old_login = refused(lambda: erin.login())
    assert old_login.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused(lambda: client.profile(other)).code() == grpc.StatusCode.UNAUTHENTICATED
    fresh = erin.login(new_keys)
    erin.step_up(fresh, recovery_code=erin.recovery_codes[0])
    assert client.profile(fresh).fingerprint == replaced.profile.fingerprint
    # sessions_revoked is shipped by the session service, the other two by identity: wait
    # for all three, since the two outboxes reach audit independently.
    expected = {"recovery_login", "keys_replaced", "sessions_revoked"}
    assert expected <= wait_for_actions(stack, "erin-mfa", expected)


def test_a_forged_key_replacement_is_refused(client: UserClient) -> None:
    frank = Account(client, "frank-mfa")
    token = frank.login()
    new_keys = UserKeys.generate(1)
    forged = new_keys.signed_prekey_proto()
    forged.signature = UserKeys.generate(0).signing.sign(b"something else")
    error = refused(
        lambda: client.identity.ReplaceAccountKeys(
            id_pb.ReplaceAccountKeysRequest(
                identity_key=new_keys.identity_public,
                verify_key=new_keys.verify_key,
                signed_prekey=forged,
                pq_prekey=new_keys.pq_prekey_proto(),
            ),
            metadata=bearer(token),
            timeout=10,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.login("frank-mfa", frank.keys)  # the old keys still work


def test_unknown_users_and_wrong_passwords_fail_alike(client: UserClient) -> None:
    gina = Account(client, "gina-mfa")
    gina.set_password(gina.login())
    answers = [
        refused(lambda: gina.password_login("not her password at all")),
        refused(
            lambda: client.session.CreatePasswordSession(
                pb.CreatePasswordSessionRequest(user_id="nobody-mfa", password=PASSWORD),
                timeout=10,
            )
        ),
    ]
    assert {a.code() for a in answers} == {grpc.StatusCode.UNAUTHENTICATED}
    assert details(answers[0]) == details(answers[1])


def test_a_stranger_spends_the_budget_but_cannot_lock_the_owner_out(client: UserClient) -> None:
    hana = Account(client, "hana-mfa")
    token = hana.login()
    hana.set_password(token)
    hana.enrol(token)
    for _ in range(4):  # PASSWORD_BUDGET=4
        guess = refused(lambda: hana.password_login("a stranger's guess", second_factor_code="1"))
        assert guess.code() == grpc.StatusCode.UNAUTHENTICATED
    beyond = refused(lambda: hana.password_login(second_factor_code=hana.next_code()))
    assert beyond.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in details(beyond)
    # The owner's recovery code refills the budget (and is the second factor) ...
    hana.password_login(recovery_code=hana.recovery_codes[0])
    for _ in range(4):
        refused(lambda: hana.password_login("a stranger's guess"))
    assert refused(lambda: hana.password_login()).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # ... and so does a login with the device key.
    hana.login()
    hana.password_login(second_factor_code=hana.next_code())


def test_sensitive_calls_need_a_recent_step_up_and_every_flow_is_audited(
    stack: Stack, client: UserClient
) -> None:
    ivan = Account(client, "ivan-mfa")
    token = ivan.login()
    ivan.set_password(token)
    ivan.enrol(token)
    fresh = ivan.login()
    ivan.step_up(fresh, recovery_code=ivan.recovery_codes[0])
    refused(lambda: ivan.step_up(fresh, code=wrong_code(ivan.secret)))
    ivan.password_login(second_factor_code=ivan.next_code())
    client.identity.RemoveTotp(
        id_pb.RemoveTotpRequest(code=ivan.next_code()), metadata=bearer(fresh), timeout=10
    )
    assert not client.profile(fresh).second_factor_enabled

    expected = {
        "password_set",
        "totp_enrollment_started",
        "totp_enabled",
        "session_stepped_up",
        "recovery_code_used",
        "second_factor_failed",
        "recovery_login",
        "totp_removed",
    }
    actions = wait_for_actions(stack, "ivan-mfa", expected)
    assert expected <= actions, expected - actions


def test_sensitive_calls_need_a_recent_step_up(tmp_path: Path) -> None:
    stack = Stack(tmp_path, extra_env={"session": {"STEP_UP_MAX_AGE_SECONDS": "2"}})
    stack.start()
    client = user_client(stack)
    try:
        judy = Account(client, "judy-mfa")
        token = judy.login()
        judy.set_password(token)  # the login itself counts as a step-up, for a while
        time.sleep(2.5)
        stale = refused(lambda: judy.set_password(token, PASSWORD + " again"))
        assert stale.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "recent step-up" in details(stale)
        revoke = refused(
            lambda: client.session.RevokeOtherSessions(
                pb.RevokeOtherSessionsRequest(), metadata=bearer(token), timeout=10
            )
        )
        assert revoke.code() == grpc.StatusCode.PERMISSION_DENIED
        client.profile(token)  # ordinary calls go on
        # Without a second factor, a fresh device-key signature is the step-up.
        challenge = client.session.CreateChallenge(
            pb.CreateChallengeRequest(user_id="judy-mfa"), timeout=10
        )
        judy.step_up(
            token,
            challenge_id=challenge.challenge_id,
            signature=judy.keys.sign_login("judy-mfa", challenge.challenge),
        )
        judy.set_password(token, PASSWORD + " again")
    finally:
        client.close()
        stack.stop()


def walkthrough_lines() -> list[str]:
    """The README's account-security walkthrough, command lines only."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    _, marker, rest = text.partition("<!-- account-security walkthrough")
    assert marker, "README.md lost its account-security walkthrough"
    block = rest.partition("```sh\n")[2].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_account_security_walkthrough_runs_as_written(
    stack: Stack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every command of the walkthrough against the real stack; the sample codes are
    replaced by real ones (from the secret `mfa enable` printed) and the password is
    typed by the test."""
    monkeypatch.setattr("getpass.getpass", lambda prompt="": PASSWORD)
    home = ["--home", str(tmp_path / "cli")]
    secret, used_step = "", 0
    recovery: list[str] = []
    outputs: list[str] = []
    for line in walkthrough_lines():
        words = shlex.split(line, comments=True)[3:]
        words = [w.replace("carol", "carol-cli") for w in words]
        for sample in ("123456", "654321"):
            if sample in words:
                used_step = max(used_step + 1, int(time.time() // STEP) - 1)
                if used_step > int(time.time() // STEP) + 1:
                    time.sleep((used_step - 1) * STEP - time.time() + 0.5)
                words[words.index(sample)] = pyotp.TOTP(secret).at(used_step * STEP)
        if "ABCD-EFGH-JKLM-NPQR" in words:
            words[words.index("ABCD-EFGH-JKLM-NPQR")] = recovery[0]
        _run(_parser().parse_args([*home, *words]), endpoints(stack))
        out = capsys.readouterr().out
        outputs.append(out)
        if words[:2] == ["mfa", "enable"]:
            secret = re.search(r"secret +([A-Z2-7]{32})", out).group(1)  # type: ignore[union-attr]
            assert "otpauth://totp/SecureMsg:carol-cli?secret=" in out
            assert "█" in out or "▀" in out  # the QR code, drawn in the terminal
            used_step = int(time.time() // STEP) - 2
        if words[:2] == ["mfa", "verify"] and "recovery codes" in out:
            recovery = re.findall(r"^  ([A-Z2-9]{4}(?:-[A-Z2-9]{4}){3})$", out, re.M)
    joined = "\n".join(outputs)
    assert "second factor enabled" in joined
    assert "this account has a second factor: run mfa verify carol-cli" in joined
    assert "session stepped up: device key and second factor" in joined
    assert "new keys for carol-cli" in joined
    assert len(recovery) == 10
