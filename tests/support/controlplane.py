"""The control-plane binaries (kube-apiserver, etcd) for tests, built or found once per session.

scripts/test.sh builds them in the background while the other suites run and hands the result
over: FLOWPROOF_CONTROLPLANE_BIN names the directory, or FLOWPROOF_CONTROLPLANE_BUILD_LOG the log
of a build that failed. Without either, the first test that needs them runs the build script
itself (minutes from an empty Go cache, 0.03 s when cached). A failed build fails every test that
needs the binaries, with the end of the build's log: it never skips them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.controlplane import ControlPlaneError, binaries

BUILD_LOG_ENV = "FLOWPROOF_CONTROLPLANE_BUILD_LOG"


def controlplane_binaries() -> Path:
    failed = os.environ.get(BUILD_LOG_ENV)
    if failed:
        try:
            text = Path(failed).read_text(errors="replace")[-4000:]
        except OSError as exc:
            text = f"(cannot read it: {exc})"
        pytest.fail(
            f"the control plane build of scripts/test.sh failed; the end of {failed}:\n{text}",
            pytrace=False,
        )
    try:
        return binaries()
    except ControlPlaneError as exc:
        pytest.fail(f"the control plane tests need kube-apiserver and etcd: {exc}", pytrace=False)
