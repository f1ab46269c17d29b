"""`-m integration` selects exactly the tests under tests/integration (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = ("tests/integration/test_cli.py", "tests/unit/test_protocol.py")
# Collection only; no cache files, and no Hypothesis plugin (two seconds of imports).
PYTEST = (sys.executable, "-m", "pytest", "--collect-only", "-q")
PLUGINS_OFF = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def test_integration_marks_every_test_under_tests_integration_and_nothing_else() -> None:
    result = subprocess.run(
        [*PYTEST, *PLUGINS_OFF, "-m", "integration", *SAMPLE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    selected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert selected == {"tests/integration/test_cli.py"}, result.stdout + result.stderr
