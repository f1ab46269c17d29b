"""Which backend a persistent service uses: PostgreSQL when DATABASE_URL is set.

`DATABASE_URL` (or `DATABASE_URL_FILE`, as Docker secrets provide: the URL holds the
role's password) names the service's own database, e.g.
`postgresql://identity:PASSWORD@db.internal:5432/identity`. Unset, the service keeps its
embedded SQLite file (`DB_PATH`). The URL is never logged or echoed in an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict

from services.common.config import Env
from services.common.errors import StartupError
from services.common.postgres.database import PoolSettings

SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class PostgresConfig:
    url: str
    pool: PoolSettings

    @classmethod
    def from_env(cls, env: Env) -> PostgresConfig | None:
        url = env.secret("DATABASE_URL", required=False)
        if url is None:
            return None
        if not url.startswith(SCHEMES):
            raise StartupError(
                "DATABASE_URL must be a postgresql:// URL (unset it to use the SQLite file "
                "in DB_PATH)"
            )
        try:
            conninfo_to_dict(url)
        except Exception:
            raise StartupError(
                "DATABASE_URL is not a valid PostgreSQL URL (percent-encode special "
                "characters in the password)"
            ) from None
        return cls(
            url=url,
            pool=PoolSettings(
                size=env.integer("DATABASE_POOL_SIZE", PoolSettings.default_size(), minimum=1),
                statement_timeout=env.number(
                    "DATABASE_STATEMENT_TIMEOUT_SECONDS", 5.0, minimum=0.1
                ),
                pool_timeout=env.number("DATABASE_POOL_TIMEOUT_SECONDS", 2.0, minimum=0.1),
            ),
        )
