"""The command-line tool's flows against real processes."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.__main__ import _demo, _parser, _run
from services.launcher.walkthrough import try_it_lines
from tests.support.stack import Stack
from tests.support.users import endpoints


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
