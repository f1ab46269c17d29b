"""Command-line tool: `python -m services.cli <command>` (run with --help for the list).

User state lives under --home (default var/cli): `<user>.keys.json` holds the private
keys, `<user>.token` the current session token, `<user>.peers.json` the public keys of
the peers you have seen (pinned the first time; a change is refused until you run
`bundle <you> <peer> --trust-new-keys`), all readable only by you.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from securemsg.admin.v1 import database_admin_service_pb2 as admin_pb
from securemsg.admin.v1 import database_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_admin_service_pb2 as audit_admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as audit_admin_grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_service_pb2 as audit_pb
from securemsg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from securemsg.identity.v1 import identity_admin_service_pb2 as identity_admin_pb
from securemsg.identity.v1 import identity_admin_service_pb2_grpc as identity_admin_grpc
from securemsg.relay.v1 import relay_admin_service_pb2 as relay_admin_pb
from securemsg.relay.v1 import relay_admin_service_pb2_grpc as relay_admin_grpc
from securemsg.session.v1 import session_admin_service_pb2 as session_admin_pb
from securemsg.session.v1 import session_admin_service_pb2_grpc as session_admin_grpc
from securemsg.session.v1 import session_pb2
from tqdm import tqdm

from services.cli import account
from services.client import backups, sealing
from services.client.keys import UserKeys
from services.client.sdk import Endpoints, UserClient
from services.protocol.ports import PERSISTENT
from services.protocol.signing import fingerprint

# A rate limit that lifts within this long is waited out (once) rather than reported.
LIMIT_WAIT_SECONDS = 15.0


class Home:
    """Where the CLI keeps each local user's keys and token."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def keys_path(self, user_id: str) -> Path:
        return self.root / f"{user_id}.keys.json"

    def keys(self, user_id: str) -> UserKeys:
        path = self.keys_path(user_id)
        if not path.exists():
            raise SystemExit(
                f"no keys for {user_id} in {self.root}; run `register {user_id}` first"
            )
        return UserKeys.load(path)

    def save_token(self, user_id: str, token: str) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / f"{user_id}.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)

    def token(self, user_id: str) -> str:
        path = self.root / f"{user_id}.token"
        if not path.exists():
            raise SystemExit(f"{user_id} is not logged in; run `login {user_id}` first")
        return path.read_text().strip()

    def forget_token(self, user_id: str) -> None:
        (self.root / f"{user_id}.token").unlink(missing_ok=True)

    def _peers_path(self, user_id: str) -> Path:
        return self.root / f"{user_id}.peers.json"

    def _peers(self, user_id: str) -> dict[str, dict[str, str]]:
        path = self._peers_path(user_id)
        return json.loads(path.read_text()) if path.exists() else {}

    def pinned(self, user_id: str, peer: str) -> PeerKeys | None:
        """The identity and verify keys `user_id` pinned for `peer`, if any."""
        entry = self._peers(user_id).get(peer)
        if entry is None:
            return None
        return PeerKeys(_unb64(entry["identity_key"]), _unb64(entry["verify_key"]))

    def pin(self, user_id: str, peer: str, keys: PeerKeys) -> None:
        peers = self._peers(user_id)
        peers[peer] = {"identity_key": _b64(keys.identity_key), "verify_key": _b64(keys.verify_key)}
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._peers_path(user_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(peers, handle, indent=1, sort_keys=True)


@dataclass(frozen=True)
class PeerKeys:
    identity_key: bytes
    verify_key: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_key, self.verify_key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _served_keys(client: UserClient, token: str, peer: str) -> PeerKeys:
    """The peer's keys as identity serves them, checked against the served fingerprint."""
    bundle = client.bundle(token, peer)
    keys = PeerKeys(bundle.identity_key, bundle.verify_key)
    if keys.fingerprint != bundle.fingerprint:
        raise ValueError(f"the bundle of {peer} does not match its own fingerprint; not trusted")
    return keys


def _peer_keys(client: UserClient, home: Home, me: str, token: str, peer: str) -> PeerKeys:
    """The keys pinned for `peer`; the first time, fetched (one bundle) and pinned.

    Later sends reuse the pin instead of fetching a bundle per message, which would use
    up the peer's one-time prekeys.
    """
    pinned = home.pinned(me, peer)
    if pinned is None:
        pinned = _served_keys(client, token, peer)
        home.pin(me, peer, pinned)
    return pinned


def _open(
    client: UserClient, home: Home, me: str, token: str, keys: UserKeys, message: Any
) -> bytes | None:
    """The text of a message, or None if it cannot be decrypted or its signature is not
    the (pinned) sender's. Never raises: one bad message must not block the inbox."""
    try:
        sender = _peer_keys(client, home, me, token, message.sender_id)
    except (grpc.RpcError, ValueError):
        return None
    return sealing.open_sealed(keys.identity, message.body, message.sender_id, sender.verify_key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.cli", description=__doc__)
    parser.add_argument("--home", type=Path, default=Path("var/cli"), help="local key store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ca", type=Path, default=Path("var/tls/ca.pem"), help="CA certificate")
    parser.add_argument(
        "--operator-cert",
        type=Path,
        default=Path("var/tls/operator.pem"),
        help="client certificate for operator commands (its key beside it as .key)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="generate keys locally and register")
    register.add_argument("user_id")
    register.add_argument("--alias", default="")
    commands.add_parser("login", help="prove key possession and store a token").add_argument(
        "user_id"
    )
    commands.add_parser("whoami", help="show your profile").add_argument("user_id")
    bundle = commands.add_parser("bundle", help="fetch a peer's key bundle and pin its keys")
    bundle.add_argument("user_id", help="you")
    bundle.add_argument("peer")
    bundle.add_argument(
        "--trust-new-keys",
        action="store_true",
        help="replace the keys pinned for the peer (after checking the fingerprint with them)",
    )
    refill = commands.add_parser("refill", help="upload fresh one-time prekeys")
    refill.add_argument("user_id")
    refill.add_argument("--count", type=int, default=20)
    send = commands.add_parser("send", help="send a message (sealed to the peer's key)")
    send.add_argument("user_id", help="you")
    send.add_argument("peer")
    send.add_argument("text")
    inbox = commands.add_parser("inbox", help="read and acknowledge your messages")
    inbox.add_argument("user_id")
    inbox.add_argument(
        "--follow", type=float, metavar="SECONDS", help="then wait this many seconds for more"
    )
    commands.add_parser("sessions", help="list your sessions").add_argument("user_id")
    commands.add_parser("logout", help="end the stored session").add_argument("user_id")
    commands.add_parser("audit", help="your own audit trail").add_argument("user_id")
    commands.add_parser("demo", help="alice sends bob a message, end to end, with audit trail")
    commands.add_parser("stats", help="operator: counts from every service")
    commands.add_parser("verify", help="operator: check the audit log's hash chain")
    commands.add_parser("cleanup", help="operator: delete expired sessions now")
    rotation = commands.add_parser("rotation", help="operator: follow a key rotation")
    rotation.add_argument("--service", choices=PERSISTENT, required=True)
    account.add_commands(commands)
    backup = commands.add_parser("backup", help="operator: hot backup of databases")
    backup.add_argument("--service", choices=[*PERSISTENT, "all"], default="all")
    backup.add_argument("--dir", type=Path, default=Path("var/backups"))
    return parser


def _run(args: argparse.Namespace, endpoints: Endpoints | None = None) -> None:
    """Runs one command; `endpoints` (tests) replaces the default ports on --host."""
    home = Home(args.home)
    endpoints = endpoints or _endpoints(args.ca, args.host, os.environ)
    command = args.command
    if command == "stats":
        _stats(endpoints, args.operator_cert)
        return
    if command == "verify":
        _verify(endpoints, args.operator_cert)
        return
    if command == "cleanup":
        with endpoints.channel("session", client_cert=args.operator_cert) as channel:
            deleted = session_admin_grpc.SessionAdminServiceStub(channel).CleanupExpiredSessions(
                session_admin_pb.CleanupExpiredSessionsRequest(), timeout=60
            )
        print(f"{deleted.deleted_count} expired sessions deleted")
        return
    if command == "demo":
        _demo(endpoints)
        return
    if command == "rotation":
        _follow_rotation(endpoints, args.operator_cert, args.service)
        return
    if command == "backup":
        for service in PERSISTENT if args.service == "all" else (args.service,):
            with (
                endpoints.channel(service, client_cert=args.operator_cert) as channel,
                _progress(desc=f"{service:8}", unit="B", unit_scale=True) as bar,
            ):
                path = backups.download_backup(channel, args.dir, _bar(bar))
            print(f"{service:8} backed up to {path}")
        return
    with _user_client(endpoints) as client:
        if command in account.COMMANDS:
            account.run(args, client, home)
        elif command == "register":
            if home.keys_path(args.user_id).exists():
                raise SystemExit(f"{home.keys_path(args.user_id)} exists; refusing to overwrite")
            keys = UserKeys.generate(20)
            profile = client.register(args.user_id, args.alias or args.user_id, keys)
            keys.save(home.keys_path(args.user_id))
            print(f"registered {profile.user_id}; fingerprint {profile.fingerprint}")
        elif command == "login":
            login = client.login_session(args.user_id, home.keys(args.user_id))
            home.save_token(args.user_id, login.token)
            print(f"logged in as {args.user_id}")
            if login.session.scope == session_pb2.SESSION_SCOPE_STEP_UP_REQUIRED:
                print(f"this account has a second factor: run mfa verify {args.user_id} <code>")
        elif command == "whoami":
            profile = client.profile(home.token(args.user_id))
            print(f"user id      {profile.user_id}")
            print(f"alias        {profile.alias}")
            print(f"fingerprint  {profile.fingerprint}")
            print(f"prekeys left {profile.one_time_prekey_count}")
            print(f"created      {_when(profile.create_time)}")
            last_login = (
                _when(profile.last_login_time) if profile.HasField("last_login_time") else "never"
            )
            print(f"last login   {last_login}")
        elif command == "bundle":
            bundle = client.bundle(home.token(args.user_id), args.peer)
            served = PeerKeys(bundle.identity_key, bundle.verify_key)
            if served.fingerprint != bundle.fingerprint:
                raise SystemExit(f"the bundle of {args.peer} does not match its fingerprint")
            pinned = home.pinned(args.user_id, args.peer)
            if pinned is not None and pinned != served and not args.trust_new_keys:
                raise SystemExit(
                    f"the keys of {args.peer} CHANGED: pinned fingerprint {pinned.fingerprint}, "
                    f"now {served.fingerprint}. Check the new fingerprint with {args.peer}, then "
                    f"run `bundle {args.user_id} {args.peer} --trust-new-keys`"
                )
            home.pin(args.user_id, args.peer, served)
            one_time = (
                bundle.one_time_prekey.key_id if bundle.HasField("one_time_prekey") else "none"
            )
            print(f"{bundle.user_id}: fingerprint {bundle.fingerprint} (pinned)")
            print(f"  signed prekey {bundle.signed_prekey.key_id}, pq prekey "
                  f"{bundle.pq_prekey.key_id}, one-time prekey {one_time}")  # fmt: skip
        elif command == "refill":
            keys = home.keys(args.user_id)
            ids = keys.add_one_time(args.count)
            count = client.upload_prekeys(home.token(args.user_id), keys.one_time_protos(ids))
            keys.save(home.keys_path(args.user_id))
            print(f"{count} one-time prekeys available")
        elif command == "send":
            token = home.token(args.user_id)
            peer = _peer_keys(client, home, args.user_id, token, args.peer)
            keys = home.keys(args.user_id)
            sealed = sealing.seal(
                peer.identity_key, args.user_id, keys.signing, args.text.encode("utf-8")
            )
            client.send(token, args.peer, sealed)
            print(f"sent {len(sealed)} encrypted bytes to {args.peer}")
        elif command == "inbox":
            token = home.token(args.user_id)
            keys = home.keys(args.user_id)
            messages = client.fetch(token)
            for message in messages:
                _show(message.sender_id, _open(client, home, args.user_id, token, keys, message))
            # Every fetched message is acknowledged, readable or not: an undecryptable one
            # would otherwise come back on every fetch until its TTL.
            if messages:
                client.acknowledge(token, [m.message_id for m in messages])
            if args.follow:
                print(f"waiting {args.follow:g} s for new messages (Ctrl-C stops)", flush=True)
                for message in client.follow(token, args.follow):
                    plaintext = _open(client, home, args.user_id, token, keys, message)
                    _show(message.sender_id, plaintext)
                    client.acknowledge(token, [message.message_id])
            elif not messages:
                print("no messages")
        elif command == "sessions":
            for s in client.sessions(home.token(args.user_id)):
                mark = "*" if s.current else " "
                print(f"{mark} {s.session_id}  {s.ip_address:15}  {s.user_agent}")
        elif command == "audit":
            with endpoints.channel("audit") as channel:
                page = audit_grpc.AuditServiceStub(channel).ListAuditEvents(
                    audit_pb.ListAuditEventsRequest(page_size=50),
                    metadata=(("authorization", f"Bearer {home.token(args.user_id)}"),),
                    timeout=10,
                )
            for event in page.events:
                when = event.occur_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                facts = " ".join(f"{k}={v}" for k, v in sorted(event.details.items()))
                print(f"{when}Z  {event.source:8}  {event.action:22} {facts}")
        elif command == "logout":
            client.logout(home.token(args.user_id))
            home.forget_token(args.user_id)
            print(f"logged out {args.user_id}")


def _user_client(endpoints: Endpoints) -> UserClient:
    def tell(seconds: float) -> None:
        print(f"rate limited: trying again in {seconds:.1f} s", file=sys.stderr)

    return UserClient(endpoints, max_wait_when_limited=LIMIT_WAIT_SECONDS, on_wait=tell)


def _progress(**options: Any) -> tqdm:  # type: ignore[type-arg]
    """A progress bar on a terminal; nothing in piped output (logs, CI), where the
    redrawn lines would only be noise. The final result is printed either way."""
    return tqdm(disable=not sys.stderr.isatty(), **options)


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")


def _endpoints(ca: Path, host: str, environ: Mapping[str, str]) -> Endpoints:
    """The default ports, unless moved by the variables that move them in docker-compose.yml
    (IDENTITY_PUBLIC_PORT, IDENTITY_INTERNAL_PORT, ...)."""

    def port(service: str, kind: str, default: int) -> int:
        variable = f"{service.upper()}_{kind}_PORT"
        raw = environ.get(variable, "").strip()
        if not raw:
            return default
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise SystemExit(f"{variable} must be a port number, got {raw!r}")
        return int(raw)

    defaults = Endpoints(ca_file=ca)
    return Endpoints(
        ca_file=ca,
        host=host,
        ports={name: port(name, "PUBLIC", p) for name, p in defaults.ports.items()},
        internal_ports={
            name: port(name, "INTERNAL", p) for name, p in defaults.internal_ports.items()
        },
    )


def _bar(bar: tqdm) -> Callable[[int, int], None]:  # type: ignore[type-arg]
    def update(done: int, total: int) -> None:
        bar.total = max(total, done)
        bar.n = done
        bar.refresh()

    return update


def _demo(endpoints: Endpoints) -> None:
    suffix = secrets.token_hex(3)
    alice, bob = f"alice-{suffix}", f"bob-{suffix}"
    keys = {name: UserKeys.generate(5) for name in (alice, bob)}
    with _user_client(endpoints) as client:
        for name in (alice, bob):
            profile = client.register(name, name.split("-")[0].capitalize(), keys[name])
            print(f"registered {name:12} fingerprint {profile.fingerprint[:19]}...")
        tokens = {name: client.login(name, keys[name]) for name in (alice, bob)}
        print(f"{alice} and {bob} logged in by signing a challenge with their keys")
        bundle = client.bundle(tokens[alice], bob)
        text = f"Hi {bob.split('-')[0]}, this is end-to-end encrypted."
        sealed = sealing.seal(bundle.identity_key, alice, keys[alice].signing, text.encode())
        client.send(tokens[alice], bob, sealed)
        print(f"{alice} sealed and signed a message to {bob}'s identity key and sent it")
        for message in client.fetch(tokens[bob]):
            sender = keys[message.sender_id].verify_key if message.sender_id in keys else b""
            plaintext = sealing.open_sealed(
                keys[bob].identity, message.body, message.sender_id, sender
            )
            shown = "<cannot decrypt>" if plaintext is None else plaintext.decode()
            print(f"{bob} received from {message.sender_id}: {shown}")
            client.acknowledge(tokens[bob], [message.message_id])
        print("\naudit trail (each user reads only their own events):")
        for name in (alice, bob):
            for event in _own_events(endpoints, tokens[name], expected=2):
                facts = " ".join(f"{k}={v}" for k, v in sorted(event.details.items()))
                print(f"  {event.source:8} {event.action:16} {event.user_id:12} {facts}")
        for name in (alice, bob):
            client.logout(tokens[name])
    print("\nboth logged out; the relay holds nothing for them any more")


def _own_events(
    endpoints: Endpoints, token: str, expected: int
) -> list[audit_event_pb2.AuditEvent]:
    """The caller's events in the order they happened, waiting for the outboxes to ship."""
    deadline = time.monotonic() + 15
    with endpoints.channel("audit") as channel:
        stub = audit_grpc.AuditServiceStub(channel)
        while True:
            events = stub.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            ).events
            if len(events) >= expected or time.monotonic() > deadline:
                return sorted(events, key=lambda e: e.occur_time.ToNanoseconds())
            time.sleep(0.3)


def _follow_rotation(endpoints: Endpoints, cert: Path, service: str) -> None:
    with endpoints.channel(service, client_cert=cert) as channel:
        stub = admin_grpc.DatabaseAdminServiceStub(channel)
        request = admin_pb.GetKeyRotationStatusRequest()
        status = stub.GetKeyRotationStatus(request, timeout=10)
        with _progress(desc=f"{service} re-encryption", unit="row") as bar:
            while not status.old_keys_retirable:
                bar.total = status.rows_done + status.rows_remaining
                bar.n = status.rows_done
                bar.refresh()
                time.sleep(0.5)
                status = stub.GetKeyRotationStatus(request, timeout=10)
            bar.total = bar.n = status.rows_done
            bar.refresh()
    versions = ", ".join(map(str, status.loaded_key_versions))
    print(
        f"{service}: all data is under key version {status.primary_key_version} "
        f"(loaded: {versions}); the old keys are no longer needed and may be deleted"
    )


def _verify(endpoints: Endpoints, cert: Path) -> None:
    checked, start = 0, 1
    with (
        endpoints.channel("audit", client_cert=cert) as channel,
        _progress(desc="audit chain", unit="event") as bar,
    ):
        stub = audit_admin_grpc.AuditAdminServiceStub(channel)
        while True:
            result = stub.VerifyAuditLog(
                audit_admin_pb.VerifyAuditLogRequest(start_sequence=start, max_events=5000),
                timeout=120,
            )
            checked += result.checked_count
            bar.total = result.total_events
            bar.n = checked
            bar.refresh()
            if not result.ok or result.next_sequence == 0:
                break
            start = result.next_sequence
    if result.ok:
        print(f"audit log intact: {checked} events verified")
    else:
        print(f"audit log BROKEN at event {result.first_bad_sequence}: {result.problem}")
        raise SystemExit(3)


def _show(sender: str, plaintext: bytes | None) -> None:
    if plaintext is None:
        text = "<cannot decrypt, or not signed by its sender's pinned key: skipped>"
    else:
        text = plaintext.decode("utf-8", "replace")
    print(f"{sender}: {text}")


def _stats(endpoints: Endpoints, cert: Path) -> None:
    with endpoints.channel("identity", client_cert=cert) as channel:
        identity = identity_admin_grpc.IdentityAdminServiceStub(channel).GetIdentityStats(
            identity_admin_pb.GetIdentityStatsRequest(), timeout=10
        )
    with endpoints.channel("session", client_cert=cert) as channel:
        session = session_admin_grpc.SessionAdminServiceStub(channel).GetSessionStats(
            session_admin_pb.GetSessionStatsRequest(), timeout=10
        )
    print(f"identity  users {identity.registered_users} (active {identity.active_users}), "
          f"one-time prekeys {identity.one_time_prekeys}")  # fmt: skip
    with endpoints.channel("relay", client_cert=cert) as channel:
        relay = relay_admin_grpc.RelayAdminServiceStub(channel).GetRelayStats(
            relay_admin_pb.GetRelayStatsRequest(), timeout=10
        )
    print(f"session   active sessions {session.active_sessions} "
          f"for {session.users_with_sessions} users")  # fmt: skip
    with endpoints.channel("audit", client_cert=cert) as channel:
        audit = audit_admin_grpc.AuditAdminServiceStub(channel).GetAuditStats(
            audit_admin_pb.GetAuditStatsRequest(), timeout=10
        )
    print(f"relay     {relay.queued_messages} queued messages ({relay.queued_bytes} bytes) "
          f"for {relay.recipients} recipients, {relay.subscribers} live subscribers")  # fmt: skip
    print(f"audit     {audit.total_events} events; outbox backlog: identity "
          f"{identity.audit_outbox_backlog}, session {session.audit_outbox_backlog}, "
          f"relay {relay.audit_outbox_backlog}")  # fmt: skip


def main() -> int:
    args = _parser().parse_args()
    try:
        _run(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("(are the services running? `make status` tells, `make run` starts them)",
                  file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
