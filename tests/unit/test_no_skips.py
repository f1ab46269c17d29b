"""The rule that nothing in `make test` skips is enforced, not hoped for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The probe's skips are spelled in pieces, so that a search of the suite for skips finds
# only real ones, never this proof that they fail.
SKIP = "skip"


def test_a_skipped_test_fails_the_run(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import pytest\n\n"
        "def test_needs_a_tool() -> None:\n"
        f"    pytest.{SKIP}('frobnicator not installed (apt install frobnicator)')\n\n"
        f"@pytest.mark.{SKIP}(reason='later')\n"
        "def test_marked() -> None:\n"
        "    pass\n\n"
        "def test_runs() -> None:\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-q", str(probe)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 error" in result.stdout  # a mark skips in setup
    assert "frobnicator not installed (apt install frobnicator)" in result.stdout
    assert "nothing in make test may skip" in result.stdout
