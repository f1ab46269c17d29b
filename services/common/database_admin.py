"""DatabaseAdminService: operator backups of a persistent service's database.

Shared by identity, session and audit; each registers it for its own database, through a
`BackupSource`: a SQLite file (hot copy with VACUUM INTO) or a PostgreSQL database
(pg_dump, see services.common.postgres.backup).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from securemsg.admin.v1 import database_admin_service_pb2 as pb
from securemsg.admin.v1 import database_admin_service_pb2_grpc as pb_grpc

from services.common import catalog
from services.common.errors import FailedPrecondition, IntegrityError
from services.common.peers import Context
from services.common.rotation import RotationStatus
from services.common.server import ServiceBinding
from services.common.sqlite import Database

CHUNK_BYTES = 256 * 1024
PROGRESS_SECONDS = 0.2


class BackupSource(Protocol):
    """What a backup is taken from."""

    def work_directory(self) -> Path:
        """Where the snapshot is written before it is streamed (private to the service)."""
        ...

    def size_bytes(self) -> int:
        """About how large the snapshot will be, for progress."""
        ...

    def snapshot(self, target: Path) -> None:
        """Writes a consistent copy to `target` while the service keeps writing."""
        ...

    def check(self, target: Path) -> None:
        """Raises IntegrityError unless the snapshot at `target` is intact."""
        ...


class RotationStatusSource(Protocol):
    def status(self) -> RotationStatus: ...


class SqliteBackupSource:
    def __init__(self, database: Database) -> None:
        self._database = database

    def work_directory(self) -> Path:
        return self._database.path.parent / "backups"

    def size_bytes(self) -> int:
        return self._database.page_bytes()

    def snapshot(self, target: Path) -> None:
        self._database.snapshot(target)

    def check(self, target: Path) -> None:
        _check_integrity(target)


class DatabaseAdminServicer(pb_grpc.DatabaseAdminServiceServicer):
    def __init__(self, service: str, source: BackupSource, rotation: RotationStatusSource) -> None:
        self._service = service
        self._source = source
        self._rotation = rotation
        self._busy = asyncio.Lock()

    async def GetKeyRotationStatus(
        self, request: pb.GetKeyRotationStatusRequest, context: Context
    ) -> pb.GetKeyRotationStatusResponse:
        status = await asyncio.to_thread(self._rotation.status)
        return pb.GetKeyRotationStatusResponse(
            primary_key_version=status.primary_version,
            loaded_key_versions=status.loaded_versions,
            rows_remaining=status.rows_remaining,
            rows_done=status.rows_done,
            old_keys_retirable=status.old_keys_retirable,
        )

    async def BackupDatabase(
        self, request: pb.BackupDatabaseRequest, context: Context
    ) -> AsyncIterator[pb.BackupDatabaseResponse]:
        if self._busy.locked():
            raise FailedPrecondition("a backup of this service is already running; wait for it")
        async with self._busy:
            workdir = self._source.work_directory()
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            snapshot = workdir / f".snapshot-{uuid.uuid4().hex}.db"
            try:
                total = await asyncio.to_thread(self._source.size_bytes)
                copy = asyncio.ensure_future(asyncio.to_thread(self._source.snapshot, snapshot))
                while not copy.done():
                    await asyncio.wait([copy], timeout=PROGRESS_SECONDS)
                    done = snapshot.stat().st_size if snapshot.exists() else 0
                    yield pb.BackupDatabaseResponse(
                        copied_bytes=min(done, total), database_bytes=total
                    )
                await copy
                await asyncio.to_thread(self._source.check, snapshot)
                yield pb.BackupDatabaseResponse(copied_bytes=total, database_bytes=total)
                digest = hashlib.sha256()
                with snapshot.open("rb") as handle:
                    while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                        digest.update(chunk)
                        yield pb.BackupDatabaseResponse(chunk=chunk)
                yield pb.BackupDatabaseResponse(
                    backup_bytes=snapshot.stat().st_size,
                    sha256=digest.hexdigest(),
                    service=self._service,
                )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    snapshot.unlink()


def _check_integrity(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if result != "ok":
        raise IntegrityError(f"backup snapshot failed integrity_check: {result}")


def binding(
    service: str, database: Database | BackupSource, rotation: RotationStatusSource
) -> ServiceBinding:
    api = catalog.database_admin(service)
    source = SqliteBackupSource(database) if isinstance(database, Database) else database
    return ServiceBinding(
        api.full_name,
        DatabaseAdminServicer(service, source, rotation),
        pb_grpc.add_DatabaseAdminServiceServicer_to_server,
        allowed_callers=api.callers,
    )
