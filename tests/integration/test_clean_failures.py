"""Careless input to the commands and services ends in one clear line and an exit code, never a
traceback: report files that cannot be written, addresses that are no addresses, ports taken."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collector.runtime import serve
from collector.settings import CollectorSettings
from flowproof.cli import main as flowproof_main
from tests.support.tls import write_tls

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"


def flowproof(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowproof.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


@pytest.mark.parametrize("flag", ["--junit", "--json", "--markdown"])
def test_check_with_a_report_file_in_a_missing_directory_is_bad_input(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "x.xml"
    code = flowproof_main(["check", "-f", str(SHOP), flag, str(target)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{flag}: '{target}' cannot be written: no directory" in err
    assert "Traceback" not in err


def test_check_with_a_directory_as_report_file_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = flowproof_main(["check", "-f", str(SHOP), "--junit", str(tmp_path)])
    assert code == 2
    assert "is a directory" in capsys.readouterr().err


def test_check_with_a_cluster_dns_ip_that_is_no_address_is_bad_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = flowproof_main(["check", "-f", str(SHOP), "--cluster-dns-ip", "not-an-ip"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--cluster-dns-ip: 'not-an-ip' is not an IP address" in err


def test_verify_with_a_report_file_in_a_missing_directory_exits_2_before_asking(
    tmp_path: Path,
) -> None:
    # No collector listens there: the file is checked first, so the error is about the file.
    done = flowproof(
        "verify",
        "--once",
        "--collector",
        "http://127.0.0.1:9",
        "--junit",
        str(tmp_path / "no" / "x.xml"),
    )
    assert done.returncode == 2, done.stderr
    assert "--junit" in done.stderr and "cannot be written: no directory" in done.stderr
    assert "cannot reach the collector" not in done.stderr
    assert "Traceback" not in done.stderr


def test_lab_test_with_a_report_file_in_a_missing_directory_builds_nothing(tmp_path: Path) -> None:
    done = flowproof(
        "lab",
        "--state-dir",
        str(tmp_path / "state"),
        "test",
        "-f",
        str(SHOP),
        "-e",
        str(SHOP),
        "--junit",
        str(tmp_path / "no" / "x.xml"),
    )
    assert done.returncode == 2, done.stderr
    assert "--junit" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_lab_up_with_a_dns_ip_that_is_no_address_is_bad_input(tmp_path: Path) -> None:
    done = flowproof("lab", "--state-dir", str(tmp_path), "up", "--dns-ip", "not-an-ip")
    assert done.returncode == 2, done.stderr
    assert "--dns-ip: 'not-an-ip' is not an IP address" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("which", ["grpc_port", "http_port"])
async def test_a_collector_whose_port_is_taken_says_so_and_exits_2(
    taken_port: socket.socket, which: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    port = taken_port.getsockname()[1]
    ports = {"grpc_port": 0, "http_port": 0, which: port}
    tls = write_tls(tmp_path)
    settings = CollectorSettings(
        source="manifests",
        manifests=(str(SHOP),),
        listen_address="127.0.0.1",
        token="t",
        tls_cert_file=str(tls.cert),
        tls_key_file=str(tls.key),
        **ports,  # type: ignore[arg-type]
    )
    with caplog.at_level(logging.INFO):
        code = await asyncio.wait_for(serve(settings, asyncio.Event()), 30)
    taken_port.close()
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"127.0.0.1:{port}" in errors[0].getMessage()
    assert f"--{which.replace('_', '-')}" in errors[0].getMessage()
    assert errors[0].exc_info is None
