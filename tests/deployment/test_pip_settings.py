"""What the image build learns of the host's pip settings, and what it never does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deployment import pip_settings


def test_index_urls_proxy_and_timeouts_go_along_local_paths_stay_behind() -> None:
    conf = pip_settings.build_config(
        {
            "index-url": "https://pypi.example/simple",
            "extra-index-url": "file:///srv/mirror/simple https://extra.example/simple",
            "find-links": "/srv/wheels",
            "constraint": "/etc/pip/constraints.txt",
            "proxy": "http://proxy.example:3128",
            "timeout": "180",
        }
    )
    assert conf.splitlines() == [
        "[global]",
        "index-url = https://pypi.example/simple",
        "extra-index-url = https://extra.example/simple",
        "proxy = http://proxy.example:3128",
        "timeout = 180",
    ]


def test_verification_is_never_switched_off() -> None:
    conf = pip_settings.build_config({"trusted-host": "pypi.example", "cert": "/x.pem"})
    assert conf == "[global]\n"  # the CA travels as its own secret, never `trusted-host`


def test_the_ca_bundle_is_the_one_pip_is_told_to_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert pip_settings.ca_bundle({"cert": str(bundle)}) == bundle
    assert pip_settings.ca_bundle({"cert": str(tmp_path / "missing.pem")}) is None
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert pip_settings.ca_bundle({}) == bundle


def test_the_build_secrets_name_a_private_pip_conf(tmp_path: Path) -> None:
    arguments = pip_settings.build_secrets(tmp_path)
    assert arguments[:2] == ["--secret", f"id=pip_conf,src={tmp_path / 'pip' / 'pip.conf'}"]
    assert (tmp_path / "pip" / "pip.conf").stat().st_mode & 0o777 == 0o600
    assert all(a == "--secret" or a.startswith("id=pip_") for a in arguments)
