"""A real control plane (etcd + kube-apiserver, built from Go modules) for the tests here.

The session fixture runs scripts/build-controlplane.sh, which builds the binaries once into a cache
outside the repository (several minutes the first time on two cores, under a second when cached),
then starts a `lab.controlplane.ControlPlane` and stops it at the end. Nothing is skipped: when the
binaries cannot be built or the control plane does not start, the tests fail with the reason.

FLOWPROOF_CONTROLPLANE_BIN names a directory with prebuilt kube-apiserver and etcd to use instead.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from lab.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-controlplane.sh"
BUILD_TIMEOUT = 3000.0  # seconds; a first build from an empty Go cache takes minutes on two cores


def _build() -> Path:
    override = os.environ.get("FLOWPROOF_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.seek(0)
            pytest.fail(
                f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT:.0f} s:\n"
                + log.read().decode(errors="replace")[-4000:],
                pytrace=False,
            )
        log.seek(0)
        errors = log.read().decode(errors="replace")
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}); the control plane tests need it:\n"
            + errors[-4000:],
            pytrace=False,
        )
    return Path(lines[-1])


@pytest.fixture(scope="session")
def controlplane_bin() -> Path:
    """The directory holding kube-apiserver and etcd, built (or found in the cache)."""
    bin_dir = _build()
    for name in ("kube-apiserver", "etcd"):
        if not os.access(bin_dir / name, os.X_OK):
            pytest.fail(f"{bin_dir / name} is missing after the build", pytrace=False)
    return bin_dir


@pytest.fixture(scope="session")
def controlplane(controlplane_bin: Path) -> Iterator[ControlPlane]:
    """One control plane for the session. ConfigMaps bypass the watch cache (see compact_etcd)."""
    with ControlPlane(controlplane_bin, uncached_resources=["configmaps"]) as cp:
        yield cp


ClientFactory = Callable[..., client.ApiClient]


@pytest.fixture
def make_client(controlplane: ControlPlane) -> Iterator[ClientFactory]:
    """Official-client ApiClients for the control plane: the admin token unless told another."""
    made: list[client.ApiClient] = []

    def make(token: str | None = None) -> client.ApiClient:
        cfg = client.Configuration(
            host=controlplane.url,
            ssl_ca_cert=str(controlplane.ca_path),
            api_key={"authorization": token or controlplane.admin_token},
            api_key_prefix={"authorization": "Bearer"},
        )
        api = client.ApiClient(cfg)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


@pytest.fixture
def core(make_client: ClientFactory) -> client.CoreV1Api:
    """CoreV1Api of the official client, as the admin."""
    return client.CoreV1Api(make_client())
