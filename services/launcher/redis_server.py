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

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

INSTALL = "apt-get install -y redis-server"

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
    """redis.conf text. `passwords` maps each service user (identity, relay, session) to its
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


class LocalRedis:
    """A private redis-server run from a folder of its own (`make run-scaled`: var/redis),
    with `hardened_config`; each service user's URL in a 0600 file beside the keys."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory.resolve()
        self.port = port

    @property
    def pid_file(self) -> Path:
        return self.directory / "redis.pid"

    def url_file(self, secrets_dir: Path, user: str) -> Path:
        return secrets_dir / f"redis-{user}.url"

    def start(self, secrets_dir: Path, users: Sequence[str]) -> dict[str, Path]:
        """Starts Redis with fresh passwords (it keeps nothing across restarts anyway);
        returns each user's URL file."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise OSError(f"redis-server not found; run: {INSTALL}")
        self.stop()
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        passwords = {user: secrets.token_urlsafe(24) for user in users}
        conf = self.directory / "redis.conf"
        _write_private(
            conf,
            hardened_config(port=self.port, directory=data, passwords=passwords)
            + f"pidfile {self.pid_file}\ndaemonize yes\nlogfile {self.directory / 'redis.log'}\n",
        )
        files = {}
        for user, password in passwords.items():
            files[user] = self.url_file(secrets_dir, user)
            _write_private(files[user], f"redis://{user}:{password}@127.0.0.1:{self.port}/0")
        result = subprocess.run([binary, str(conf)], capture_output=True, text=True, check=False)
        give_up = time.monotonic() + 10
        while self.pid() is None and time.monotonic() < give_up:
            time.sleep(0.05)
        if result.returncode != 0 or self.pid() is None:
            raise OSError(f"redis-server did not start (port {self.port} taken?): {result.stderr}")
        return files

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop(self) -> bool:
        """Stops Redis if it runs; True if it did. Its memory, and so every queued
        message, is gone."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        give_up = time.monotonic() + 10
        while self.pid() is not None and time.monotonic() < give_up:
            time.sleep(0.05)
        return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
