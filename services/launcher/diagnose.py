"""Why a service did not start: its own last words, and who holds the port it wanted.

A service that refuses to start says why on stderr ("identity: refusing to start: ...",
see services.common.server.run), which the launcher sends to the service's log. When
the reason is a port in use, the process holding it is looked up in /proc (Linux;
other systems, or processes of other users, simply go unnamed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PORT_KINDS = ("public", "internal", "metrics")
_REFUSAL = re.compile(r"refusing to start: (.+)$", re.MULTILINE)
_PORT = re.compile(r":(\d{1,5})\b")
_TCP_LISTEN = "0A"


def refusal(output: str) -> str | None:
    """The reason in the last "refusing to start" line of a service's output."""
    reasons = _REFUSAL.findall(output)
    return str(reasons[-1]).strip() if reasons else None


def port_holder(port: int, proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """(pid, command name) of a process listening on TCP `port`, if it can be found."""
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in inodes:
                try:
                    name = (entry / "comm").read_text().strip()
                except OSError:
                    name = "?"
                return int(entry.name), name
    return None


def explain(output: str, ports: tuple[int, int, int]) -> str:
    """One line on why a service with these (public, internal, metrics) ports stopped."""
    reason = refusal(output)
    if reason is None:
        return "it exited before it was serving"
    for found in _PORT.findall(reason):
        if int(found) not in ports:
            continue
        port = int(found)
        kind = PORT_KINDS[ports.index(port)]
        holder = port_holder(port)
        if holder is not None:
            pid, name = holder
            return f"{kind} port {port} is in use by pid {pid} ({name}); stop it and retry"
        if "in use" in reason:
            return f"{kind} port {port} is in use by another process; free it and retry"
    return reason
