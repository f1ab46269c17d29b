"""Provisioning: one database and one role per service, each reaching only its own.

An operator runs this once per service with a superuser connection (`launcher`'s
PostgreSQL mode and the tests do it for you). The role is an ordinary login role that owns
its database; CONNECT is revoked from PUBLIC, so identity's role cannot even open
session's database, let alone read its tables.
"""

from __future__ import annotations

import psycopg
from psycopg import sql


def provision_service(
    admin: psycopg.Connection[object], *, database: str, role: str, password: str
) -> None:
    """Creates `role` (login, no other privilege) and `database` owned by it.

    `admin` must be an autocommit superuser connection (CREATE DATABASE cannot run in a
    transaction). Existing objects are left as they are, so provisioning can be re-run.
    """
    exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if exists is None:
        admin.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
            ).format(sql.Identifier(role), sql.Literal(password))
        )
    found = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
    if found is None:
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    admin.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
    admin.execute(
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
            sql.Identifier(database), sql.Identifier(role)
        )
    )
