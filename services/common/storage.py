"""What a persistent service's wiring gets from its storage backend, whichever it is.

SQLite (one process per file) and PostgreSQL (any number of replicas) differ in how they
open, rotate keys and take backups; the wiring only needs these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from services.common.audit_events import AuditSink
from services.common.crypto import Keyring
from services.common.outbox import Outbox
from services.common.rotation import RotationStatus
from services.common.server import ServiceBinding

StoreT = TypeVar("StoreT", covariant=True)
OutboxT = TypeVar("OutboxT", bound="DurableOutbox | None", covariant=True)


class DurableOutbox(Outbox, AuditSink, Protocol):
    """An outbox in the service's database: shipped in the background, recorded into."""


class BackgroundRotation(Protocol):
    def status(self) -> RotationStatus: ...
    def run(self) -> Coroutine[Any, Any, None]: ...


@dataclass(frozen=True)
class Storage(Generic[StoreT, OutboxT]):
    store: StoreT
    outbox: OutboxT  # DurableOutbox, or None for the audit service, which has none
    rotation: BackgroundRotation
    admin: ServiceBinding  # DatabaseAdminService: rotation status, backups
    close: Callable[[], None]
    keyring: Keyring
