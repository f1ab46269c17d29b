"""The README's "Try it", line by line, against a running stack (compose tests)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

from services.launcher.topology import SERVICES
from services.launcher.walkthrough import try_it_lines


def walk_through(cli: Callable[..., str]) -> None:
    """Runs every line as `make run` prints it through `cli` (the CLI's arguments in,
    its output back), checking what each prints; `--follow 30` becomes 1 s."""
    commands = [
        shlex.split(line.replace("--follow 30", "--follow 1"), comments=True)
        for line in try_it_lines()
    ]
    assert all(words[:3] == [".venv/bin/python", "-m", "services.cli"] for words in commands)
    walked = {words[3] for words in commands}
    assert {"register", "login", "send", "inbox", "stats", "verify"} <= walked
    sent: dict[str, list[str]] = {}
    for words in commands:
        command = words[3:]
        out = cli(*command)
        match command:
            case ["register", user, *_]:
                assert f"registered {user}" in out
            case ["login", user]:
                assert f"logged in as {user}" in out
            case ["send", sender, recipient, text]:
                assert f"encrypted bytes to {recipient}" in out
                sent.setdefault(recipient, []).append(f"{sender}: {text}")
            case ["inbox", user, *_]:
                for line in sent.pop(user, []):
                    assert line in out
            case ["stats"]:
                for name in SERVICES:
                    assert re.search(rf"^{name}\s", out, re.MULTILINE), out
            case ["verify"]:
                assert "audit log intact" in out
    assert not sent, f"the walkthrough never read {sent}"
