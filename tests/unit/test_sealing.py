"""Seals over assignments and the delivery ledger kept across collector restarts."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from collector.core.sealing import AssignmentSeal
from collector.ledger import DeliveryLedger, assignment_key
from flowproof.probes import Assignment, PodRef, ProbeKind, ResponderSpec, SourceKind

A = Assignment(
    id="a-1",
    source=PodRef("0b0b0b0b-0000-4000-8000-000000000000", "shop", "frontend-0"),
    source_node="node-1",
    destination_ip="10.244.2.5",
    port=8080,
    protocol="TCP",
    kind=ProbeKind.HTTP,
    timeout_seconds=0.5,
    source_kind=SourceKind.POD,
    destination=PodRef("0b0b0b0b-0000-4000-8000-000000000001", "shop", "api-0"),
    http_path="/healthz",
    http_host="api",
    responder=ResponderSpec(PodRef("u", "shop", "api-0"), "node-2"),
    attempt=1,
    flow_key="shop/shop/frontend-to-api#0",
)
CHANGED = {
    "id": "a-2",
    "source": PodRef("other", "shop", "frontend-0"),
    "source_node": "node-2",
    "destination_ip": "10.244.2.6",
    "port": 8081,
    "protocol": "UDP",
    "kind": ProbeKind.TCP,
    "timeout_seconds": 0.6,
    "source_kind": SourceKind.PROBE_POD,
    "destination": None,
    "http_path": "/",
    "http_host": None,
    "dns_query_name": "x.example",
    "responder": None,
    "attempt": 2,
    "flow_key": "shop/shop/other#0",
}


def test_every_field_of_an_assignment_is_sealed() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(Assignment)}
    seal = AssignmentSeal(b"k" * 32)
    mac = seal.seal(A, 1_000)
    assert seal.verify(A, 1_000, mac)
    assert not seal.verify(A, 1_001, mac), "the issue time is sealed"
    for name, value in CHANGED.items():
        assert not seal.verify(dataclasses.replace(A, **{name: value}), 1_000, mac), name
    assert not AssignmentSeal(b"x" * 32).verify(A, 1_000, mac), "another key"


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        AssignmentSeal(b"short")


def test_the_ledger_is_read_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "delivered.jsonl"
    first = DeliveryLedger(10, path)
    first.add("r1", "a1")
    first.add("r2", "a2")
    first.flush()
    # No close: a killed collector never closes it.
    second = DeliveryLedger(10, path)
    assert second.has_result("r1") and second.has_assignment("a2")
    assert not second.has_result("r3")
    first.close()
    second.close()


def test_the_ledger_keeps_the_newest_and_compacts_its_file(tmp_path: Path) -> None:
    path = tmp_path / "delivered.jsonl"
    ledger = DeliveryLedger(3, path)
    for i in range(20):
        ledger.add(f"r{i}", f"a{i}")
        ledger.flush()
    ledger.close()
    assert len(path.read_text().splitlines()) < 20
    again = DeliveryLedger(3, path)
    assert [again.has_result(f"r{i}") for i in (16, 17, 18, 19)] == [False, True, True, True]
    again.close()


def test_the_assignment_key_is_kept_in_the_state_directory_mode_0600(tmp_path: Path) -> None:
    key = assignment_key(str(tmp_path / "state"))
    assert len(key) == 32
    assert assignment_key(str(tmp_path / "state")) == key
    mode = (tmp_path / "state" / "assignment.key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert assignment_key("") != assignment_key(""), "without a directory: random per process"


def test_the_ledger_forgets_what_is_older_than_its_horizon() -> None:
    now = [0.0]
    ledger = DeliveryLedger(1000, horizon_seconds=300, monotonic=lambda: now[0])
    ledger.add("r1", "a1")
    now[0] = 200
    ledger.add("r2", "a2")
    now[0] = 301
    ledger.add("r3", "a3")
    assert not ledger.has_result("r1") and not ledger.has_assignment("a1")
    assert ledger.has_result("r2") and ledger.has_result("r3")
    ledger.close()
