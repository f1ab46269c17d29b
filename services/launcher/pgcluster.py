"""A PostgreSQL cluster of our own in a directory, from Debian's `postgresql` package.

Used by `make run-scaled` (var/postgres) and by the tests (a throw-away directory). The
server binaries live off PATH, under /usr/lib/postgresql/<version>/bin. initdb refuses to
run as root, so as root the cluster belongs to the `postgres` user (`runuser -u postgres`)
and its directory is chowned to it. The server listens on 127.0.0.1 only, with `trust`
authentication for local development and tests: never for a deployment.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

INSTALL = "apt-get update && apt-get install -y postgresql"


class ClusterError(Exception):
    """The cluster could not be created, started or stopped (the message says why)."""


def bin_dir() -> Path:
    """Where initdb and pg_ctl are; raises ClusterError with the install command."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise ClusterError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; run: {INSTALL}")


class LocalCluster:
    def __init__(self, directory: Path, port: int, *, options: str = "") -> None:
        self.directory = directory.resolve()  # the server runs in its own working directory
        self.port = port
        self._options = options
        self._owner = "postgres" if os.geteuid() == 0 else None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "server.log"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def initialize(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            entry = pwd.getpwnam(self._owner)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.directory.chmod(0o700)
        self._run(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start(self) -> bool:
        """Starts the server; False if it did not come up (the port may be taken)."""
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 {self._options}"
        )
        result = self._run(
            [
                str(bin_dir() / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            ],
            check=False,
        )
        return result.returncode == 0

    def running(self) -> bool:
        status = self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data), "status"], check=False)
        return status.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """`fast`: sessions are cut off, data is kept consistent; `immediate`: a crash."""
        self._run([str(bin_dir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop"])

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if check and result.returncode != 0:
            raise ClusterError(f"{Path(argv[-1]).name} failed: {result.stdout}{result.stderr}")
        return result
