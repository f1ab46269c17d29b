"""A private development CA and one certificate per service and for the operator.

The CA's private key is never written anywhere: every certificate is signed in one go
and the key is forgotten, so no file on the machine (and no compromised service process)
can mint a certificate, an operator's least of all. When a certificate is missing or the
CA is about to expire, the whole set is made again under a new CA.

Each certificate carries only what its holder needs:
- services: their name as common name (what internal APIs check) and DNS name, plus
  localhost and the loopback addresses where the local stack reaches every service;
  server and client use (a service serves its ports and calls other services);
- the operator: its common name only, client use only (it serves nothing).

Private keys are written with mode 0600. Production deployments bring their own CA,
kept offline.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
CA_CERT = "ca.pem"
# Where older releases kept the CA key; removed on sight.
_LEGACY_CA_KEY = "ca.key"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SecureMsg development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _complete(directory: Path, names: list[str]) -> bool:
    """Whether every certificate is there and the CA has more than a day left."""
    paths = [directory / CA_CERT]
    for name in names:
        paths += [directory / f"{name}.pem", directory / f"{name}.key"]
    if not all(path.exists() for path in paths):
        return False
    ca = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    return ca.not_valid_after_utc > soon


def ensure_pki(directory: Path, services: Iterable[str], clients: Iterable[str] = ()) -> None:
    """Makes ca.pem and <name>.pem/<name>.key for every service and client name, unless
    all of them are there already (then nothing changes)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / _LEGACY_CA_KEY).unlink(missing_ok=True)
    services, clients = list(services), list(clients)
    if _complete(directory, services + clients):
        return
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())  # lives only until this returns
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("SecureMsg development CA"))
        .issuer_name(_name("SecureMsg development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    # Without ca.pem the set counts as incomplete, so an interrupted run starts over.
    (directory / CA_CERT).unlink(missing_ok=True)
    for name in services + clients:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
        )
        if name in services:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(name),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(directory / f"{name}.key", _key_pem(key))
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
