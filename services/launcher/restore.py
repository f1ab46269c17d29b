"""Restoring a backup into a data directory, on the host that will serve it.

This runs beside the servers, not in the client: proving that the master key unlocks a
backup takes the server's storage code (the key-check value and SQLite's integrity check).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from services.common.sqlite import check_unlocks


def restore_backup(backup: Path, data_dir: Path, service: str, master_key: str) -> Path:
    """Copies a verified backup to <data_dir>/<service>.db, which must not exist yet.

    Verification: SQLite integrity check, and the key-check value proves `master_key`
    decrypts it. The service then starts on the restored file as on its own.
    """
    check_unlocks(backup, master_key)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = data_dir / f"{service}.db"
    if target.exists():
        raise FileExistsError(f"{target} exists; restore into an empty data directory")
    partial = data_dir / f".{service}.db.restoring"
    partial.unlink(missing_ok=True)
    # Readable by the owner only, like the database the service itself creates.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, backup.open("rb") as source:
        shutil.copyfileobj(source, out)
        out.flush()
        os.fsync(out.fileno())
    partial.rename(target)
    return target
