"""The README's "Try it" walkthrough, which `make run` prints, is made of CLI commands
that the CLI accepts as written."""

from __future__ import annotations

import shlex

import pytest

from services.cli.__main__ import _parser
from services.launcher.walkthrough import try_it_lines

PREFIX = [".venv/bin/python", "-m", "services.cli"]


def test_the_walkthrough_is_cli_commands_the_cli_accepts() -> None:
    lines = try_it_lines()
    assert len(lines) >= 10
    for line in lines:
        words = shlex.split(line, comments=True)
        assert words[:3] == PREFIX, line
        try:
            _parser().parse_args(words[3:])
        except SystemExit:
            pytest.fail(f"the CLI refuses a README line: {line}")
