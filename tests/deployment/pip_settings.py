"""The host's pip settings, handed to the image build so that its pip reaches the index
the way the host's does.

What goes along: index URLs, proxy, timeouts (as a pip.conf) and the CA bundle pip is told
to trust (as pip's `cert`), both as build secrets, which never end up in a layer. What
stays behind: local paths (file:// indexes, wheel folders, constraint files), which do not
exist inside the build, and `trusted-host`, which would switch verification off.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

URL_KEYS = ("index-url", "extra-index-url", "find-links")
PLAIN_KEYS = ("proxy", "timeout", "default-timeout", "retries")
SECTIONS = ("global", "install", ":env:")  # later lines of `pip config list` win


def host_settings() -> dict[str, str]:
    """pip's effective settings for `pip install` on this host (files and PIP_* variables)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in SECTIONS and raw:
            settings[name] = str(ast.literal_eval(raw))
    return settings


def build_config(settings: dict[str, str]) -> str:
    """A pip.conf for the build: the network settings, without anything local."""
    lines = ["[global]"]
    for key in URL_KEYS:
        urls = [u for u in settings.get(key, "").split() if u.startswith(("https://", "http://"))]
        if urls:
            lines.append(f"{key} = {' '.join(urls)}")
    for key in PLAIN_KEYS:
        if settings.get(key):
            lines.append(f"{key} = {settings[key]}")
    return "\n".join(lines) + "\n"


def ca_bundle(settings: dict[str, str]) -> Path | None:
    """The CA bundle the host's pip verifies the index with, when one is configured."""
    for candidate in (
        settings.get("cert"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None  # pip's own bundle, in the build as on the host


def build_secrets(workdir: Path) -> list[str]:
    """`podman build` arguments giving the Dockerfile's pip steps the host's settings."""
    settings = host_settings()
    folder = workdir / "pip"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = folder / "pip.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # URLs may hold tokens
    with os.fdopen(fd, "w") as handle:
        handle.write(build_config(settings))
    arguments = ["--secret", f"id=pip_conf,src={conf}"]
    ca = ca_bundle(settings)
    if ca is not None:
        arguments += ["--secret", f"id=pip_ca,src={ca}"]
    return arguments
