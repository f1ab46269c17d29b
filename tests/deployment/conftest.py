"""Prints how long each phase of the compose test took, at the end of the run."""

from __future__ import annotations

import pytest

from tests.deployment.timing import FIRST_ANSWERS, PHASES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PHASES:
        terminalreporter.write_sep("-", "compose test phases")
        for phase, seconds in PHASES.items():
            terminalreporter.write_line(f"{phase:28} {seconds:6.1f} s")
    if FIRST_ANSWERS:
        terminalreporter.write_sep("-", "first answers after healthy")
        for path, (seconds, refused) in FIRST_ANSWERS.items():
            terminalreporter.write_line(f"{path:42} {seconds:6.1f} s  ({refused} refused)")
