"""The "Try it" commands that `make run` prints: read from README.md, their one source.

The README block follows a marker comment, so that an edit to the walkthrough in the
README is what the next `make run` shows. Tests check that the CLI accepts every line,
run them against a real stack, and see `make run`'s launcher print them.
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- try-it:"


def try_it_lines(readme: Path = README) -> list[str]:
    """The command lines of the README's "Try it" block, comments kept."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return [f"see README.md, section Try it ({readme} is not readable)"]
    _, marker, rest = text.partition(MARKER)
    _, fence, block = rest.partition("```sh\n")
    if not marker or not fence or "```" not in block:
        raise ValueError(f"{readme.name}: no ```sh block after the {MARKER} marker")
    return [line for line in block.split("```", 1)[0].splitlines() if line.strip()]
