"""Leases: at most one replica at a time does a job (ship an outbox, rotate keys).

A lease is a row: `UPDATE leases SET holder = me, until = now + ttl WHERE name = job AND
(holder = me OR until < now)`. The holder renews it well before it runs out; when the
holder dies, the lease expires and another replica takes it over. Time is the database's
clock (`clock_timestamp()`), never a replica's, since replica clocks differ. No advisory
locks: CockroachDB and some poolers lack them, and a row is visible to an operator.

A lease alone cannot stop a holder that stalled past its expiry from finishing work it
had begun. Jobs that must never run twice at once (re-chaining the audit log) therefore
also call `hold_in(conn)` inside their own write transaction: it locks the lease row and
fails unless this replica still holds it, so the work commits only under the lease.
"""

from __future__ import annotations

import os
import secrets
import socket

from services.common.errors import Unavailable
from services.common.postgres.database import Connection, PgDatabase

_NOW = "extract(epoch FROM clock_timestamp())"


def replica_id() -> str:
    """A name for this process, unique across replicas and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class LeaseLost(Unavailable):
    """This replica no longer holds the lease it worked under."""


class Lease:
    def __init__(self, db: PgDatabase, name: str, holder: str, *, ttl: float = 15.0) -> None:
        self._db = db
        self.name = name
        self.holder = holder
        self.ttl = ttl

    def acquire(self) -> bool:
        """Takes or renews the lease; False while another live replica holds it."""
        with self._db.write() as conn:
            row = conn.execute(
                f"UPDATE leases SET holder = %s, until = {_NOW} + %s"  # noqa: S608
                f" WHERE name = %s AND (holder = %s OR until < {_NOW}) RETURNING name",
                (self.holder, self.ttl, self.name, self.holder),
            ).fetchone()
            if row is not None:
                return True
            inserted = conn.execute(
                f"INSERT INTO leases (name, holder, until) VALUES (%s, %s, {_NOW} + %s)"  # noqa: S608
                " ON CONFLICT (name) DO NOTHING RETURNING name",
                (self.name, self.holder, self.ttl),
            ).fetchone()
            return inserted is not None

    def hold_in(self, conn: Connection) -> None:
        """Inside a write transaction: locks the lease row, raises LeaseLost unless held."""
        row = conn.execute(
            f"SELECT 1 FROM leases WHERE name = %s AND holder = %s AND until >= {_NOW}"  # noqa: S608
            " FOR UPDATE",
            (self.name, self.holder),
        ).fetchone()
        if row is None:
            raise LeaseLost(f"lease {self.name} is held by another replica")

    def release(self) -> None:
        """Gives the lease up at once (a clean stop), so another replica need not wait."""
        with self._db.write() as conn:
            conn.execute(
                "UPDATE leases SET until = 0 WHERE name = %s AND holder = %s",
                (self.name, self.holder),
            )

    def holder_now(self) -> str | None:
        """Who holds the lease now (None when nobody does); for status and tests."""
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT holder FROM leases WHERE name = %s AND until >= {_NOW}",  # noqa: S608
                (self.name,),
            ).fetchone()
        return None if row is None else str(row["holder"])
