"""The Redis configuration the relay's promise needs: nothing ever reaches disk.

`--save "" --appendonly no` alone is not enough: any client allowed `BGSAVE`, `SAVE` or
`CONFIG SET dir` could still write `dump.rdb` (a snapshot of every queued message). So
the services log in as ACL users without `@admin` and `@dangerous`, the default user is
off, replication is diskless on both ends (a replica never writes the primary's data to a
file), and memory is never evicted silently (`noeviction`: a full Redis refuses writes,
which the relay answers with RESOURCE_EXHAUSTED, instead of dropping queued messages).

One function writes the file, used by `make run-scaled`, the compose scale-out and the
tests, so all three run Redis the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# What each service's user may do: every key and channel, no admin or dangerous command
# (SAVE, BGSAVE, CONFIG, DEBUG, FLUSHALL, KEYS, MIGRATE, SHUTDOWN, ...).
SERVICE_RULES = "on ~* &* +@all -@admin -@dangerous"


def hardened_config(
    *,
    port: int,
    directory: Path,
    passwords: Mapping[str, str],
    bind: str = "127.0.0.1",
    maxmemory: str = "512mb",
    admin_password: str | None = None,
) -> str:
    """redis.conf text. `passwords` maps each service user (relay, session) to its
    password; `admin_password` adds an operator user with every command, for
    inspection only (tests, `redis-cli`): never give it to a service."""
    lines = [
        f"port {port}",
        f"bind {bind}",
        "protected-mode yes",
        f"dir {directory}",
        # Memory only: no snapshots, no append-only file, diskless replication.
        'save ""',
        "appendonly no",
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
        "repl-diskless-load on-empty-db",
        f"maxmemory {maxmemory}",
        "maxmemory-policy noeviction",
        # No client may turn persistence back on from outside.
        "enable-protected-configs no",
        "enable-debug-command no",
        "enable-module-command no",
        "user default off",
    ]
    for user, password in sorted(passwords.items()):
        lines.append(f"user {user} reset {SERVICE_RULES} >{password}")
    if admin_password is not None:
        lines.append(f"user admin reset on ~* &* +@all >{admin_password}")
    return "\n".join(lines) + "\n"
