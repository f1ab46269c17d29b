"""CLI commands for account security: `mfa enable|verify|disable`, `recovery-codes`,
`password set`, `recover`.

Passwords are read without echo (or from standard input with --password-stdin, for
scripts); codes are arguments because they are short-lived and single-use anyway.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc
import segno
from securemsg.session.v1 import session_pb2

from services.client.keys import UserKeys
from services.client.sdk import UserClient


class Home(Protocol):
    """The CLI's local store of keys and tokens (services.cli.__main__.Home)."""

    def keys_path(self, user_id: str) -> Path: ...
    def keys(self, user_id: str) -> UserKeys: ...
    def save_token(self, user_id: str, token: str) -> None: ...
    def token(self, user_id: str) -> str: ...


COMMANDS = ("mfa", "recovery-codes", "password", "recover")


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mfa = commands.add_parser("mfa", help="TOTP second factor: enable, verify, disable")
    steps = mfa.add_subparsers(dest="mfa_command", required=True)
    enable = steps.add_parser("enable", help="start enrolling: secret, otpauth:// URI, QR code")
    enable.add_argument("user_id")
    enable.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    verify = steps.add_parser(
        "verify", help="a code from your app: activates a new enrolment, or steps the session up"
    )
    verify.add_argument("user_id")
    verify.add_argument("code", nargs="?", default="")
    verify.add_argument("--recovery-code", default="", help="instead of a code (used up)")
    disable = steps.add_parser("disable", help="remove the second factor (needs a code)")
    disable.add_argument("user_id")
    disable.add_argument("code", nargs="?", default="")
    disable.add_argument("--recovery-code", default="", help="instead of a code (used up)")

    codes = commands.add_parser("recovery-codes", help="replace your recovery codes (shown once)")
    codes.add_argument("user_id")

    password = commands.add_parser("password", help="the password for recovering a lost device")
    password_steps = password.add_subparsers(dest="password_command", required=True)
    set_password = password_steps.add_parser("set", help="set or change your password")
    set_password.add_argument("user_id")
    set_password.add_argument("--password-stdin", action="store_true", help="read it from stdin")

    recover = commands.add_parser(
        "recover", help="lost device: log in by password, then replace your keys (or deactivate)"
    )
    recover.add_argument("user_id")
    recover.add_argument("--code", default="", help="a code from your authenticator app")
    recover.add_argument("--recovery-code", default="", help="or one of your recovery codes")
    recover.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    recover.add_argument(
        "--deactivate", action="store_true", help="close the account instead of replacing keys"
    )


def _password(from_stdin: bool, *, confirm: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != first:
        raise SystemExit("the two passwords differ; nothing was changed")
    return first


def _show_codes(codes: list[str]) -> None:
    print("recovery codes (each works once; store them somewhere safe, they are not shown again):")
    for code in codes:
        print(f"  {code}")


def _describe(session: session_pb2.Session) -> str:
    level = session_pb2.AssuranceLevel.Name(session.assurance_level)
    return level.removeprefix("ASSURANCE_LEVEL_").lower().replace("_", " ")


def run(args: argparse.Namespace, client: UserClient, home: Home) -> None:
    handlers: dict[str, Callable[[argparse.Namespace, UserClient, Home], None]] = {
        "mfa": _mfa,
        "recovery-codes": _recovery_codes,
        "password": _set_password,
        "recover": _recover,
    }
    handlers[args.command](args, client, home)


def _mfa(args: argparse.Namespace, client: UserClient, home: Home) -> None:
    token = home.token(args.user_id)
    if args.mfa_command == "enable":
        enrollment = client.begin_totp(token)
        print(f"secret       {enrollment.secret}")
        print(f"otpauth URI  {enrollment.otpauth_uri}")
        if not args.no_qr:
            segno.make(enrollment.otpauth_uri, error="m").terminal(compact=True)
        print(f"add it to your authenticator app, then run: mfa verify {args.user_id} <code>")
        return
    if bool(args.code) == bool(args.recovery_code):
        raise SystemExit("give a code from your authenticator app, or --recovery-code")
    if args.mfa_command == "disable":
        client.remove_totp(token, args.code, args.recovery_code)
        print(f"second factor removed from {args.user_id}")
        return
    if args.code:
        try:
            _show_codes(client.activate_totp(token, args.code))
            print(f"second factor enabled for {args.user_id}")
            return
        except grpc.RpcError as exc:
            # No enrolment pending, or a session that must step up: it is a step-up.
            if exc.code() not in {
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED,
            }:
                raise
    session = client.step_up(token, args.code, args.recovery_code)
    print(f"session stepped up: {_describe(session)}")


def _recovery_codes(args: argparse.Namespace, client: UserClient, home: Home) -> None:
    _show_codes(client.regenerate_recovery_codes(home.token(args.user_id)))


def _set_password(args: argparse.Namespace, client: UserClient, home: Home) -> None:
    token = home.token(args.user_id)
    client.set_password(token, _password(args.password_stdin, confirm=True))
    print(f"password set for {args.user_id}")


def _recover(args: argparse.Namespace, client: UserClient, home: Home) -> None:
    password = _password(args.password_stdin, confirm=False)
    reply = client.password_session(args.user_id, password, args.code, args.recovery_code)
    print(f"recovery session open ({_describe(reply.session)}); it may only replace keys")
    if args.deactivate:
        client.deactivate(reply.token)
        print(f"account {args.user_id} deactivated")
        return
    keys = UserKeys.generate(20)
    replaced = client.replace_keys(reply.token, keys)
    path = home.keys_path(args.user_id)
    if path.exists():
        path.replace(path.with_name(path.name + ".replaced"))
    keys.save(path)
    print(f"new keys for {args.user_id}; fingerprint {replaced.profile.fingerprint}")
    print(f"{replaced.revoked_session_count} other sessions revoked; tell your contacts")
    client.logout(reply.token)
    login = client.login_session(args.user_id, keys)
    home.save_token(args.user_id, login.token)
    if login.session.scope == session_pb2.SESSION_SCOPE_STEP_UP_REQUIRED:
        print(f"logged in with the new keys; now run: mfa verify {args.user_id} <code>")
    else:
        print("logged in with the new keys")
