"""TLS material for tests: one throwaway CA and a collector certificate for the loopback address.

Issued once per test session by the lab's own issuer (lab/certs.py); `write_tls` puts the files
where a test's settings can name them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from collector.dispatching import ServerTLS
from lab.certs import COLLECTOR_NAME, IssuedCertificates, issue


@functools.cache
def issued() -> IssuedCertificates:
    return issue(["127.0.0.1", "localhost", COLLECTOR_NAME])


def server_tls() -> ServerTLS:
    return ServerTLS(certificate_chain=issued().certificate, private_key=issued().key)


def ca_pem() -> bytes:
    return issued().ca


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    def collector_env(self) -> dict[str, str]:
        return {"FLOWPROOF_TLS_CERT_FILE": str(self.cert), "FLOWPROOF_TLS_KEY_FILE": str(self.key)}


def write_tls(directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.crt", directory / "collector.crt", directory / "collector.key")
    files.ca.write_bytes(issued().ca)
    files.cert.write_bytes(issued().certificate)
    files.key.write_bytes(issued().key)
    files.key.chmod(0o600)
    return files
