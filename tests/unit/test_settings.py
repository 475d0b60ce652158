"""Collector settings: flags beat environment beat defaults; bad values are named; the token stays secret."""

from __future__ import annotations

import os

import pytest

from collector.settings import CollectorSettings, load_settings
from flowproof.errors import ConfigurationError
from tests.support.tls import TLSFiles, write_tls


@pytest.fixture(autouse=True)
def tls(tmp_path, monkeypatch) -> TLSFiles:
    """Every collector needs its certificate; the settings read it from the environment here."""
    files = write_tls(tmp_path / "tls")
    for name, value in files.collector_env().items():
        monkeypatch.setenv(name, value)
    return files


def env(**values: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("FLOWPROOF_TLS_")} | values


def test_defaults_with_a_token_from_the_environment(tls):
    settings = load_settings([], env(FLOWPROOF_TOKEN="s3cret"))
    assert settings == CollectorSettings(
        token="s3cret", tls_cert_file=str(tls.cert), tls_key_file=str(tls.key)
    )
    assert "s3cret" not in settings.describe()
    assert " token=" not in settings.describe() and "verify_token=" not in settings.describe()


def test_flag_beats_environment_and_types_are_converted():
    settings = load_settings(
        ["--grpc-port", "7000", "--probe-timeout-seconds", "0.5"],
        env(FLOWPROOF_TOKEN="t", FLOWPROOF_GRPC_PORT="6000", FLOWPROOF_HTTP_PORT="0"),
    )
    assert settings.grpc_port == 7000
    assert settings.http_port == 0
    assert settings.planner.probe_timeout_seconds == 0.5


def test_manifest_paths_from_the_environment_are_comma_separated(tmp_path):
    settings = load_settings(
        ["--source", "manifests"],
        env(FLOWPROOF_TOKEN="t", FLOWPROOF_MANIFESTS=f"{tmp_path}/a, {tmp_path}/b"),
    )
    assert settings.manifests == (f"{tmp_path}/a", f"{tmp_path}/b")


def test_token_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_settings(["--token-file", str(path)], env()).token == "from-file"


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        pytest.param([], {}, "token: required", id="the token is required"),
        pytest.param(
            ["--source", "etcd"],
            {"FLOWPROOF_TOKEN": "t"},
            "source: 'etcd'",
            id="an unknown source is named",
        ),
        pytest.param(
            ["--source", "manifests"],
            {"FLOWPROOF_TOKEN": "t"},
            "manifests:",
            id="manifests need paths",
        ),
        pytest.param(
            ["--grpc-port", "x"],
            {"FLOWPROOF_TOKEN": "t"},
            "grpc_port: 'x' is not a number",
            id="a port must be a number",
        ),
        pytest.param(
            ["--grpc-port", "70000"],
            {"FLOWPROOF_TOKEN": "t"},
            "outside 0-65535",
            id="a port must fit",
        ),
        pytest.param(
            ["--cluster-dns-ip", "dns"],
            {"FLOWPROOF_TOKEN": "t"},
            "cluster_dns_ip",
            id="the DNS address must be an IP",
        ),
        pytest.param(
            ["--freshness-seconds", "1"],
            {"FLOWPROOF_TOKEN": "t"},
            "freshness_seconds",
            id="freshness must exceed the cadence",
        ),
        pytest.param(
            ["--leader-election=true", "--source", "manifests", "--manifests", "x"],
            {"FLOWPROOF_TOKEN": "t"},
            "leader_election: needs --source kubernetes",
            id="leader election needs the API",
        ),
        pytest.param(
            ["--leader-election=true", "--lease-renew-deadline-seconds", "20"],
            {"FLOWPROOF_TOKEN": "t"},
            r"lease_duration_seconds: 15 must exceed lease_renew_deadline_seconds \(20\)",
            id="the lease outlasts the renew deadline",
        ),
        pytest.param(
            ["--leader-election=true", "--lease-retry-period-seconds", "9"],
            {"FLOWPROOF_TOKEN": "t"},
            r"lease_renew_deadline_seconds: 10 must exceed 1.2 × lease_retry_period_seconds",
            id="the renew deadline allows retries",
        ),
        pytest.param(
            ["--leader-election=true", "--lease-duration-seconds", "15.5"],
            {"FLOWPROOF_TOKEN": "t"},
            "lease_duration_seconds: whole seconds",
            id="the lease duration is whole seconds",
        ),
        pytest.param(
            ["--leader-election=true", "--lease-name", "Not_A_Name"],
            {"FLOWPROOF_TOKEN": "t"},
            "lease_name: 'Not_A_Name' is not an object name",
            id="the lease name is an object name",
        ),
        pytest.param(
            ["--leader-election=true", "--leader-election-namespace", "a.b"],
            {"FLOWPROOF_TOKEN": "t"},
            "leader_election_namespace: 'a.b' is not a namespace name",
            id="the lease namespace is a namespace name",
        ),
        pytest.param(
            ["--token-file", "/nonexistent/token"],
            {},
            "token file",
            id="an unreadable token file is named",
        ),
    ],
)
def test_bad_settings_are_named(argv, environ, message):
    with pytest.raises(ConfigurationError, match=message):
        load_settings(argv, env(**environ))


def test_the_collector_needs_its_certificate_and_key(tmp_path):
    with pytest.raises(ConfigurationError, match="tls_cert_file: required"):
        load_settings([], {"FLOWPROOF_TOKEN": "t"})
    with pytest.raises(ConfigurationError, match="tls_key_file: '/nonexistent' cannot be read"):
        load_settings(["--tls-key-file", "/nonexistent"], env(FLOWPROOF_TOKEN="t"))


def test_leader_election_settings_are_read_with_their_defaults():
    settings = load_settings(["--leader-election=true"], env(FLOWPROOF_TOKEN="t"))
    assert settings.leader_election
    assert (settings.lease_name, settings.leader_election_namespace) == ("flowproof-collector", "")
    timing = (
        settings.lease_duration_seconds,
        settings.lease_renew_deadline_seconds,
        settings.lease_retry_period_seconds,
    )
    assert timing == (15.0, 10.0, 2.0)
    named = load_settings(
        [],
        env(
            FLOWPROOF_TOKEN="t",
            FLOWPROOF_LEADER_ELECTION="true",
            FLOWPROOF_LEADER_ELECTION_NAMESPACE="flowproof",
            FLOWPROOF_LEADER_ELECTION_IDENTITY="flowproof-collector-7d9f-x2",
        ),
    )
    assert named.leader_election_identity == "flowproof-collector-7d9f-x2"
    assert named.leader_election_namespace == "flowproof"
