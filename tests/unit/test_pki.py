"""The development PKI: no CA key on disk, and each certificate only its own names and use."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.launcher.pki import ensure_pki

SERVICES = ("identity", "session", "relay", "audit")


def cert(directory: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())


def usages(certificate: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    ensure_pki(tmp_path / "tls", SERVICES, ("operator",))
    return tmp_path / "tls"


def test_no_ca_private_key_is_kept_anywhere(tls: Path) -> None:
    # A compromised service process could otherwise mint an operator certificate.
    keys = sorted(p.name for p in tls.iterdir() if b"PRIVATE KEY" in p.read_bytes())
    assert keys == sorted(f"{name}.key" for name in (*SERVICES, "operator"))
    assert not (tls / "ca.key").exists()


def test_every_certificate_is_signed_by_the_ca(tls: Path) -> None:
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    for name in (*SERVICES, "operator"):
        cert(tls, name).verify_directly_issued_by(ca)


def test_the_operator_certificate_is_for_clients_only_and_names_no_host(tls: Path) -> None:
    operator = cert(tls, "operator")
    assert usages(operator) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(x509.ExtensionNotFound):
        operator.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_certificate_names_only_its_service_and_the_local_host(
    tls: Path, name: str
) -> None:
    service = cert(tls, name)
    names = service.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {name, "localhost"}
    assert usages(service) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not service.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_complete_set_is_left_alone_and_a_missing_piece_renews_all(tls: Path) -> None:
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    ensure_pki(tls, SERVICES, ("operator",))
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before
    (tls / "relay.key").unlink()
    (tls / "ca.key").write_bytes(b"left over by an older release")
    ensure_pki(tls, SERVICES, ("operator",))
    after = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert set(after) == set(before)  # the old CA key is gone too
    assert after["ca.pem"] != before["ca.pem"]
    ca = x509.load_pem_x509_certificate(after["ca.pem"])
    for name in (*SERVICES, "operator"):
        cert(tls, name).verify_directly_issued_by(ca)
