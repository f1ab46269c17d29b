"""The command-line tool's flows against real processes."""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.__main__ import _demo, _parser, _run
from services.client import sealing
from services.client.keys import UserKeys
from services.launcher.walkthrough import try_it_lines
from tests.support.stack import Stack
from tests.support.users import endpoints, user_client


@pytest.fixture
def full_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path, ("identity", "session", "relay", "audit"))
    stack.start()
    yield stack
    stack.stop()


def test_the_demo_delivers_a_message_and_shows_the_audit_trail(
    full_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    _demo(endpoints(full_stack))
    out = capsys.readouterr().out
    assert "this is end-to-end encrypted." in out
    assert "received from alice-" in out
    trail = out.split("audit trail")[1]
    assert trail.count("user_registered") == 2
    assert trail.count("user_login") == 2


def test_the_readme_walkthrough_runs_as_written(
    full_stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every line of the README's "Try it", in order, against a real stack; only the
    live wait is shortened (`--follow 30` becomes 1 s)."""
    tls = full_stack.layout.tls
    options = ["--home", str(tmp_path / "cli"), "--operator-cert", str(tls / "operator.pem")]
    outputs = {}
    for line in try_it_lines():
        words = shlex.split(line.replace("--follow 30", "--follow 1"), comments=True)[3:]
        _run(_parser().parse_args([*options, *words]), endpoints(full_stack))
        captured = capsys.readouterr()
        outputs[" ".join(words[:2])] = captured.out
        assert captured.err == "", f"{line}: {captured.err}"  # no progress bars when piped
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    assert re.search(rf"created      {when}\nlast login   {when}", outputs["whoami alice"])
    assert "waiting 1 s for new messages" in outputs["inbox bob"]
    assert "alice: hello, bob" in outputs["inbox bob"]
    assert "audit log intact" in outputs["verify"]
    assert outputs["logout alice"] == "logged out alice\n"


def test_a_hostile_or_forged_message_is_skipped_acknowledged_and_never_blocks_the_inbox(
    full_stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path / "cli")]

    def cli(*words: str) -> str:
        _run(_parser().parse_args([*home, *words]), endpoints(full_stack))
        return capsys.readouterr().out

    for name in ("alice", "bob", "mallory"):
        cli("register", name)
        cli("login", name)
    cli("send", "alice", "bob", "the real one")
    mallory_keys = UserKeys.load(tmp_path / "cli" / "mallory.keys.json")
    bob_keys = UserKeys.load(tmp_path / "cli" / "bob.keys.json")
    mallory_token = (tmp_path / "cli" / "mallory.token").read_text()
    with user_client(full_stack) as client:
        # A low-order ephemeral key (made `cli inbox` crash before acknowledging), and a
        # well-sealed box whose signature claims to come from alice.
        client.send(mallory_token, "bob", b"\x02" + bytes(150))
        forged = sealing.seal(bob_keys.identity_public, "alice", mallory_keys.signing, b"pay up")
        client.send(mallory_token, "bob", forged)
    out = cli("inbox", "bob")
    assert "alice: the real one" in out
    assert out.count("mallory: <cannot decrypt, or not signed") == 2
    assert "pay up" not in out
    assert cli("inbox", "bob") == "no messages\n"  # all three were acknowledged


def test_peers_are_pinned_and_sends_reuse_the_pin_instead_of_a_prekey(
    full_stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "cli"

    def cli(*words: str) -> str:
        _run(_parser().parse_args(["--home", str(home), *words]), endpoints(full_stack))
        return capsys.readouterr().out

    for name in ("alice", "bob"):
        cli("register", name)
        cli("login", name)
    left = int(cli("whoami", "bob").split("prekeys left")[1].split()[0])
    for n in range(3):
        cli("send", "alice", "bob", f"message {n}")
    assert int(cli("whoami", "bob").split("prekeys left")[1].split()[0]) == left - 1
    assert [line for line in cli("inbox", "bob").splitlines()] == [
        f"alice: message {n}" for n in range(3)
    ]
    # Bob's pin for alice no longer matches what identity serves (as after a key change
    # or a malicious server): the bundle is refused until bob says he checked it, and
    # messages do not verify against the old pin.
    pins = json.loads((home / "bob.peers.json").read_text())
    pins["alice"]["verify_key"] = base64.b64encode(UserKeys.generate(0).verify_key).decode()
    (home / "bob.peers.json").write_text(json.dumps(pins))
    with pytest.raises(SystemExit, match="the keys of alice CHANGED"):
        cli("bundle", "bob", "alice")
    cli("send", "alice", "bob", "after the change")
    assert "alice: <cannot decrypt, or not signed" in cli("inbox", "bob")
    assert "(pinned)" in cli("bundle", "bob", "alice", "--trust-new-keys")
    cli("send", "alice", "bob", "trusted again")
    assert "alice: trusted again" in cli("inbox", "bob")
