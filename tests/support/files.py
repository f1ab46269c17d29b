"""Looking at the files a service keeps, as a test needs to."""

from __future__ import annotations

from pathlib import Path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in `directory` (a database with its -wal and -shm, a lock...): name to
    content, so that one comparison shows whether anything was created, removed or
    changed."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}
