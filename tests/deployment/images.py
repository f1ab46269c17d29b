"""Images for the compose test, made without an image registry.

- The base: Debian made offline by debootstrap and imported into podman, cached in
  podman's store under a tag keyed by what went into it, and kept between runs.
- Prometheus: Debian's package on that base (deploy/prometheus/Containerfile), cached
  the same way.
- The project's image: the real Dockerfile with BASE_IMAGE pointing at the base. Its
  build-stage layers stay in podman's layer cache; the tagged image is the run's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.deployment import pip_settings
from tests.deployment.podman import REPO, Podman

SUITE = "bookworm"  # Python 3.11, as in the official python:3.11-slim image
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Dockerfile needs of a base: python (and venv, pip), useradd, CA certificates.
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "python-is-python3",
    "passwd",
    "ca-certificates",
)
# Kept between runs, under these names only (`make compose-clean` removes them).
BASE_REPOSITORY = "localhost/securemsg-test-base"
PROMETHEUS_REPOSITORY = "localhost/securemsg-test-prometheus"
PROMETHEUS_CONTAINERFILE = REPO / "deploy" / "prometheus" / "Containerfile"


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """One maker at a time per machine: other engineers' runs share podman's store."""
    path = Path(tempfile.gettempdir()) / f"securemsg-{name}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_image(podman: Podman) -> str:
    """A Debian base with Python, from the cache or made now (about a minute)."""
    tag = f"{BASE_REPOSITORY}:{_key(SUITE, 'minbase', *BASE_PACKAGES)}"
    with _machine_lock("base-image"):
        if podman.image_exists(tag):
            return tag
        with tempfile.TemporaryDirectory(prefix="securemsg-base-") as tmp:
            root = Path(tmp) / "root"
            result = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if result.returncode != 0:
                raise AssertionError(
                    f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                )
            # Package caches and lists only make the image bigger.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            imported = subprocess.run(
                ["podman", "import", "--change", 'CMD ["python3"]', "-", tag],
                stdin=tar.stdout,
                env=podman.env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            tar.stdout.close()
            tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise AssertionError(f"podman import failed: {imported.stderr[-3000:]}")
    return tag


def prometheus_image(podman: Podman, base: str) -> str:
    """Prometheus from Debian's package on the base, from the cache or built now."""
    return debian_image(podman, base, PROMETHEUS_CONTAINERFILE.parent, PROMETHEUS_REPOSITORY)


def debian_image(podman: Podman, base: str, folder: Path, repository: str) -> str:
    """The image `folder`'s Containerfile makes from Debian's packages on the base, from
    the cache (tagged by the base, the Containerfile and the files it copies) or built now."""
    containerfile = (folder / "Containerfile").read_text()
    copied = re.findall(r"^COPY\s+(\S+)", containerfile, re.MULTILINE)
    tag = f"{repository}:{_key(base, containerfile, *((folder / c).read_text() for c in copied))}"
    with _machine_lock(repository.rsplit("/", 1)[-1]):
        if not podman.image_exists(tag):
            podman.run(
                "build",
                "--network=host",  # apt reaches Debian's mirror the way the host does
                "--build-arg", f"BASE_IMAGE={base}",
                "--file", str(folder / "Containerfile"),
                "--tag", tag,
                str(folder),
                timeout=900,
            )  # fmt: skip
    return tag


def build_project_image(podman: Podman, tag: str, base: str, workdir: Path) -> None:
    """The real Dockerfile, its pip steps reaching the package index as the host does."""
    secrets = pip_settings.build_secrets(workdir)
    try:
        podman.run(
            "build",
            # The build's pip and the host's share a network path (proxy, resolver):
            # RUN steps use the host's network. Nothing is published or served.
            "--network=host",
            "--layers",
            "--build-arg", f"BASE_IMAGE={base}",
            *secrets,
            "--file", str(REPO / "Dockerfile"),
            "--tag", tag,
            str(REPO),
            timeout=1200,
        )  # fmt: skip
    finally:
        shutil.rmtree(workdir / "pip", ignore_errors=True)
