"""Backups taken through DatabaseAdminService, streamed to a local file.

Restoring one is server-side work (`python -m services.launcher restore`): it needs the
master key and the storage code that checks it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from securemsg.admin.v1 import database_admin_service_pb2 as pb
from securemsg.admin.v1 import database_admin_service_pb2_grpc as pb_grpc

Progress = Callable[[int, int], None]  # (done, total) bytes


def download_backup(
    channel: grpc.Channel, directory: Path, progress: Progress | None = None, timeout: float = 3600
) -> Path:
    """Streams a snapshot into `directory` as <service>-<UTC time>.db (SQLite) or .dump (a
    PostgreSQL custom-format archive, for pg_restore); returns its path.

    The file appears under its final name only after its size and SHA-256 match what the
    server announced.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = directory / f".partial-{os.getpid()}.db"
    digest = hashlib.sha256()
    received = 0
    head = b""
    final: pb.BackupDatabaseResponse | None = None
    stream = pb_grpc.DatabaseAdminServiceStub(channel).BackupDatabase(
        pb.BackupDatabaseRequest(), timeout=timeout
    )
    try:
        # Owner-only, like the database it copies (the snapshot is as encrypted as that).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            for message in stream:
                if message.chunk:
                    if not head:
                        head = message.chunk[:5]
                    handle.write(message.chunk)
                    digest.update(message.chunk)
                    received += len(message.chunk)
                    if progress and final is None:
                        progress(received, received)
                elif message.sha256:
                    final = message
                elif progress:
                    progress(message.copied_bytes, message.database_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        if final is None or final.backup_bytes != received or final.sha256 != digest.hexdigest():
            raise ValueError("backup stream ended early or arrived damaged; take it again")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        suffix = ".dump" if head == b"PGDMP" else ".db"
        target = directory / f"{final.service}-{stamp}{suffix}"
        partial.rename(target)
        return target
    finally:
        partial.unlink(missing_ok=True)
