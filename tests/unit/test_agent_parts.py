"""The agent's small parts: result buffer, backoff, rate limit, settings, errno mapping."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from agent.probing import DestinationRateLimiter, classify_os_error
from agent.settings import AgentSettings, load_settings
from agent.streaming import ResultOutbox
from flowproof import convert
from flowproof.aio import Backoff
from flowproof.errors import ConfigurationError
from flowproof.probes import Assignment, Outcome, PodRef, ProbeKind, ProbeResult
from flowproof.v1 import agent_pb2 as pb
from tests.support.clock import ManualClock
from tests.support.tls import write_tls


def result(i: int) -> pb.ProbeResult:
    a = Assignment(id=f"a{i}", source=PodRef(uid="u"), source_node="n", destination_ip="10.0.0.1",
                   port=80, protocol="TCP", kind=ProbeKind.TCP, timeout_seconds=1)  # fmt: skip
    r = ProbeResult(id=f"r{i}", assignment=a, outcome=Outcome.CONNECTED, latency_seconds=0,
                    node="n", started_at=0)  # fmt: skip
    return convert.result_to_proto(r)


class TestResultOutbox:
    def test_results_are_kept_until_acked_and_resent_after_rewind(self) -> None:
        box = ResultOutbox(capacity=10)
        for i in range(3):
            box.add(result(i))
        assert [r.id for r in box.take_unsent(2)] == ["r0", "r1"]
        assert [r.id for r in box.take_unsent(5)] == ["r2"]
        assert box.take_unsent(5) == []
        box.ack(["r1"])
        assert len(box) == 2 and box.holds("a0") and not box.holds("a1")
        box.rewind()  # a new stream: everything unacked goes again, in order
        assert [r.id for r in box.take_unsent(5)] == ["r0", "r2"]

    def test_overflow_drops_the_oldest_and_counts_it(self) -> None:
        box = ResultOutbox(capacity=3)
        for i in range(5):
            box.add(result(i))
        assert box.dropped_total == 2
        assert [r.id for r in box.take_unsent(10)] == ["r2", "r3", "r4"]
        assert box.assignment_ids() == {"a2", "a3", "a4"}

    def test_acks_for_unknown_ids_are_ignored(self) -> None:
        box = ResultOutbox(capacity=3)
        box.add(result(0))
        box.ack(["nope", "r0", "r0"])
        assert len(box) == 0


def test_backoff_grows_exponentially_with_full_jitter_and_resets() -> None:
    backoff = Backoff(initial_seconds=0.5, max_seconds=8.0, rng=random.Random(7))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_rate_limit_allows_a_burst_then_spaces_probes_per_destination() -> None:
    clock = ManualClock()
    limiter = DestinationRateLimiter(rate_per_second=10, burst=3, clock=clock)
    waits = [limiter.reserve("10.0.0.1") for _ in range(5)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2])
    assert limiter.reserve("10.0.0.2") == 0  # another destination has its own budget
    clock.now += 10  # idle for a while: the burst is back
    assert [limiter.reserve("10.0.0.1") for _ in range(3)] == [0, 0, 0]


@pytest.mark.parametrize(
    ("err", "outcome"),
    [
        pytest.param(errno.ECONNREFUSED, Outcome.REFUSED, id="ECONNREFUSED is a refusal"),
        pytest.param(errno.ETIMEDOUT, Outcome.TIMEOUT, id="ETIMEDOUT is a timeout"),
        pytest.param(errno.EHOSTUNREACH, Outcome.UNREACHABLE, id="EHOSTUNREACH is unreachable"),
        pytest.param(errno.ENETUNREACH, Outcome.UNREACHABLE, id="ENETUNREACH is unreachable"),
        pytest.param(errno.EPERM, Outcome.UNREACHABLE, id="EPERM from an egress filter"),
        pytest.param(errno.EACCES, Outcome.UNREACHABLE, id="EACCES from a prohibit route"),
        pytest.param(errno.EMFILE, Outcome.ERROR, id="anything else is an error"),
    ],
)
def test_errno_to_outcome(err: int, outcome: Outcome) -> None:
    assert classify_os_error(OSError(err, "x")) is outcome


class TestSettings:
    def test_flags_win_over_environment_and_defaults_fill_the_rest(self, tmp_path: Path) -> None:
        token = tmp_path / "token"
        token.write_text("  t0ken\n")
        ca = write_tls(tmp_path / "tls").ca
        settings = load_settings(
            ["--node-name", "node-1", "--max-concurrency", "32", "--token-file", str(token)],
            {
                "FLOWPROOF_AGENT_CA_FILE": str(ca),
                "FLOWPROOF_COLLECTOR": "collector:7070",
                "FLOWPROOF_AGENT_MAX_CONCURRENCY": "16",
                "FLOWPROOF_AGENT_DESTINATION_RATE_PER_SECOND": "2.5",
                "NODE_NAME": "ignored",
            },
        )
        assert settings.node_name == "node-1"
        assert settings.collector_address == "collector:7070"
        assert settings.max_concurrency == 32
        assert settings.destination_rate_per_second == 2.5
        assert settings.token == "t0ken"
        assert settings.max_in_flight == AgentSettings.max_in_flight
        assert "t0ken" not in repr(settings) and "t0ken" not in settings.describe()

    @pytest.mark.parametrize(
        ("argv", "env", "message"),
        [
            pytest.param([], {"FLOWPROOF_COLLECTOR": "c:1", "FLOWPROOF_TOKEN": "t"},
                         "node_name: required", id="the node name is required"),
            pytest.param(["--node-name", "n"], {"FLOWPROOF_TOKEN": "t"},
                         "collector_address", id="the collector address is required"),
            pytest.param(["--node-name", "n", "--collector-address", "c:1"], {},
                         "token: required", id="the token is required"),
            pytest.param(["--node-name", "n", "--collector-address", "c:1", "--max-concurrency",
                          "many"], {"FLOWPROOF_TOKEN": "t"}, "max_concurrency: 'many'",
                         id="a number must be a number"),
            pytest.param(["--node-name", "n", "--collector-address", "c:1", "--max-concurrency",
                          "0"], {"FLOWPROOF_TOKEN": "t"}, "max_concurrency: must be positive",
                         id="limits must be positive"),
            pytest.param(["--node-name", "n", "--collector-address", "c:1", "--token-file",
                          "/nonexistent/token"], {}, "token file", id="an unreadable token file"),
        ],
    )  # fmt: skip
    def test_settings_that_cannot_work_are_refused(
        self, argv: list[str], env: dict[str, str], message: str, tmp_path: Path
    ) -> None:
        ca = write_tls(tmp_path / "tls").ca
        with pytest.raises(ConfigurationError, match=message):
            load_settings(argv, {"FLOWPROOF_AGENT_CA_FILE": str(ca), **env})

    def test_the_agent_needs_the_ca_of_its_collector(self, tmp_path: Path) -> None:
        argv = ["--node-name", "n", "--collector-address", "c:1"]
        with pytest.raises(ConfigurationError, match="ca_file: required"):
            load_settings(argv, {"FLOWPROOF_TOKEN": "t"})
        with pytest.raises(ConfigurationError, match="ca_file: '/nonexistent' cannot be read"):
            load_settings([*argv, "--ca-file", "/nonexistent"], {"FLOWPROOF_TOKEN": "t"})

    def test_every_setting_has_a_docstring_as_its_help(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit):
            load_settings(["--help"], {})
        text = " ".join(capsys.readouterr().out.split())
        assert "Probes running at the same time; the others wait their turn." in text
        assert "--token-file" in text and "--token " not in text
