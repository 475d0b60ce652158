"""A throwaway certificate authority for the lab's loop: agents authenticate their collector.

Owns issuing a CA and one server certificate for the collector (for the loopback address and the
name `flowproof-collector`), written to the lab's state directory: the CA certificate (agents trust
it), the collector's certificate and key (mode 0600). The CA's own key is never written: nothing
can be signed with it after `up`, so the lab's CA cannot vouch for anything else. In a cluster the
certificate comes from a Secret or cert-manager instead (docs/install.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COLLECTOR_NAME = "flowproof-collector"
"""The name every lab collector certificate carries (agents may check it with
`--collector-server-name`)."""
VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class IssuedCertificates:
    """PEM bytes of a CA certificate and one server certificate with its private key."""

    ca: bytes
    certificate: bytes
    key: bytes


@dataclass(frozen=True)
class CertificateFiles:
    """Where a lab keeps its loop's certificates."""

    ca: Path
    certificate: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(hosts: Sequence[str], *, common_name: str = COLLECTOR_NAME) -> IssuedCertificates:
    """A new CA and a server certificate for `hosts` (IP addresses or DNS names), in memory."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"flowproof lab CA {os.urandom(4).hex()}")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificates(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        certificate=certificate.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_lab_certificates(directory: Path, hosts: Sequence[str]) -> CertificateFiles:
    """Issue the lab's CA and collector certificate into `directory` (the key mode 0600)."""
    issued = issue([*hosts, COLLECTOR_NAME])
    files = CertificateFiles(
        ca=directory / "ca.crt",
        certificate=directory / "collector.crt",
        key=directory / "collector.key",
    )
    _write(files.ca, issued.ca, 0o644)
    _write(files.certificate, issued.certificate, 0o644)
    _write(files.key, issued.key, 0o600)
    return files
