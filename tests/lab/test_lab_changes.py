"""A lab change is whole or not at all: kernel rules, state.json and the cluster file always agree.

Every change is validated and rendered before the first step; a step that fails anyway (a full
disk, a failing nft) rolls the kernel, the state and the cluster file back to the policies of
before. Each test builds its own lab; the kernel is read back with `nft list` and probed with
real packets.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from labtools import pod, run

from collector.reading.manifests import load_snapshot
from flowproof.errors import InputError
from lab import applying, changing, enforcing, system
from lab.enforcement import compile_rulesets
from lab.enforcing import enforcement_input
from lab.lifecycle import Lab, manifests_from, read_manifests
from lab.probing import probe_matrix
from lab.state import LabPaths, LabState

pytestmark = pytest.mark.lab

MakeLab = Callable[..., Lab]

DENY_B = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-c, namespace: x}
spec: {podSelector: {matchLabels: {app: c}}, policyTypes: [Ingress]}
"""

EXPECTATIONS_WITH_A_DATE = """---
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata:
  name: reviewed
  namespace: x
  annotations:
    reviewed: 2024-01-01
spec:
  flows:
    - name: a-not-to-b
      from: {podSelector: {matchLabels: {app: a}}}
      to: {podSelector: {matchLabels: {app: b}}}
      ports: ["80/TCP"]
      expect: deny
"""


def three_pods() -> list[Any]:
    return [
        pod("x", "a", labels={"app": "a"}, ips=("10.244.1.11",)),
        pod("x", "b", labels={"app": "b"}, ips=("10.244.2.11",)),
        pod("x", "c", labels={"app": "c"}, ips=("10.244.3.11",)),
    ]


# --- what the kernel, the state and the files say --------------------------------------------------

_ISOLATED = re.compile(r'chain (ingress|egress) \{.*?comment "isolated by ([^"]*)"', re.S)


def isolation_of(table: str) -> dict[str, str]:
    """direction -> the policies isolating it, from an nft table (compiled or listed)."""
    return {m.group(1): m.group(2) for m in _ISOLATED.finditer(table)}


def kernel_isolation(state: LabState) -> dict[str, dict[str, str]]:
    """Per pod, what the kernel enforces: read back from each pod's namespace with `nft list`."""
    found: dict[str, dict[str, str]] = {}
    for record in state.pods:
        if record.host_network:
            continue
        done = subprocess.run(
            [
                "nsenter",
                f"--net={system.netns_path(record.netns)}",
                "nft",
                "list",
                "table",
                "inet",
                "flowproof",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        found[record.key] = isolation_of(done.stdout) if done.returncode == 0 else {"missing": ""}
    return found


def documents(text: str) -> list[Any]:
    """The cluster file's documents (one JSON document per line after each `---`)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_agree(lab: Lab) -> LabState:
    """Kernel rules, state.json and the cluster file describe the same lab; the state."""
    state = lab.paths.load()
    compiled = compile_rulesets(enforcement_input(state))
    assert kernel_isolation(state) == {k: isolation_of(t) for k, t in compiled.items()}
    assert state.enforced_generation == state.generation
    assert documents(lab.paths.cluster_file.read_text()) == documents(
        changing.cluster_text(state, lab.name)
    )
    snapshot = load_snapshot([lab.paths.cluster_file])  # the collector reads it as it is
    assert sorted(p.key for p in snapshot.policies) == sorted(
        f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in state.policies
    )
    assert lab.status()["policies"] == sorted(p.key for p in snapshot.policies)
    return state


def reachable(lab: Lab, source: str, destination: str) -> bool:
    outcomes = run(probe_matrix(lab, [(source, destination)], 80, "TCP", 0.3))
    return outcomes[(source, destination)]


# --- an unquoted date ----------------------------------------------------------------------------


def test_an_unquoted_date_is_stored_as_its_text_and_the_whole_file_applies(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(manifests_from(three_pods()))
    path = tmp_path / "change.yaml"
    path.write_text(DENY_B + EXPECTATIONS_WITH_A_DATE)
    lab.apply(read_manifests([path]))
    state = assert_agree(lab)
    assert sorted(p["metadata"]["name"] for p in state.policies) == ["deny-b", "deny-c"]
    (stored,) = state.expectations
    assert stored["metadata"]["annotations"] == {"reviewed": "2024-01-01"}
    assert not reachable(lab, "x/a", "x/b")


def test_a_value_json_cannot_hold_is_bad_input_and_changes_nothing(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(manifests_from(three_pods()))
    before = lab.paths.state_file.read_text()
    cluster = lab.paths.cluster_file.read_text()
    path = tmp_path / "change.yaml"
    path.write_text(DENY_B + EXPECTATIONS_WITH_A_DATE.replace("2024-01-01", "!!binary aGVsbG8="))
    with pytest.raises(
        InputError, match=r"metadata\.annotations\.reviewed.*bytes cannot be stored"
    ):
        lab.apply(read_manifests([path]))
    assert json.loads(lab.paths.state_file.read_text()) == json.loads(before)
    assert lab.paths.cluster_file.read_text() == cluster
    assert_agree(lab)
    assert reachable(lab, "x/a", "x/b")


# --- a step that fails ---------------------------------------------------------------------------


class Injected(OSError):
    """The failure a test injects into one step of a change."""


@pytest.fixture
def fail_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """`fail_at(step)`: the next change fails at `step` (once); the rollback itself works."""

    def arm(step: str) -> None:
        armed = {"on": True}

        def once() -> None:
            if armed["on"]:
                armed["on"] = False
                raise Injected(f"injected failure at {step}")

        def around(module: Any, name: str, before: bool = True) -> None:
            real = getattr(module, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if before:
                    once()
                result = real(*args, **kwargs)
                if not before:
                    once()
                return result

            monkeypatch.setattr(module, name, wrapper)

        if step == "recording the change":
            around(LabPaths, "save")
        elif step == "half the kernel rules":
            real_apply = applying.apply_rulesets

            def half(paths: LabPaths, state: LabState, rulesets: dict[str, str]) -> int:
                keys = sorted(rulesets)
                real_apply(paths, state, {k: rulesets[k] for k in keys[: len(keys) // 2 + 1]})
                once()
                return 0

            monkeypatch.setattr(enforcing, "apply_rulesets", half)
        elif step == "saving the state at the end":
            real_write = changing.write_cluster

            def then_fail_save(paths: LabPaths, state: LabState) -> None:
                real_write(paths, state)
                around(LabPaths, "save")

            monkeypatch.setattr(changing, "write_cluster", then_fail_save)
        else:
            name = {
                "removing pods": "remove_pods",
                "creating pods": "create_pods",
                "the DNS zone": "write_dns",
                "starting servers": "start_servers",
                "the cluster file": "write_cluster",
            }[step]
            around(changing, name, before=name != "create_pods")

    return arm


STEPS = [
    "recording the change",
    "removing pods",
    "creating pods",
    "half the kernel rules",
    "the DNS zone",
    "starting servers",
    "the cluster file",
    "saving the state at the end",
]


@pytest.mark.parametrize("step", STEPS)
def test_a_change_that_fails_at_any_step_leaves_kernel_state_and_files_agreeing(
    make_lab: MakeLab, tmp_path: Path, fail_at: Callable[[str], None], step: str
) -> None:
    lab = make_lab(manifests_from(three_pods()))
    path = tmp_path / "change.yaml"
    # The change removes c's pod, adds d, and isolates b and c: every kind of step runs.
    path.write_text(DENY_B + EXPECTATIONS_WITH_A_DATE.replace("2024-01-01", '"2024-01-01"'))
    change = read_manifests([path])
    pods = [p for p in three_pods() if p.name != "c"] + [
        pod("x", "d", labels={"app": "b"}, ips=("10.244.3.12",))
    ]
    change = type(change)(
        namespaces=change.namespaces,
        declared_namespaces=change.declared_namespaces,
        pods=tuple(pods),
        policies=change.policies,
        expectations=change.expectations,
    )
    policies_before = lab.state().policies
    fail_at(step)
    with pytest.raises(Injected):
        lab.apply(change, prune=True)
    state = assert_agree(lab)
    assert state.policies == policies_before, "the policies of before are back"
    assert reachable(lab, "x/a", "x/b"), "the kernel enforces no policy the state does not know"
    # The lab works on: the same change applies cleanly now, and the kernel enforces it.
    lab.apply(change, prune=True)
    state = assert_agree(lab)
    assert sorted(p["metadata"]["name"] for p in state.policies) == ["deny-b", "deny-c"]
    assert sorted(r.key for r in state.pods if r.namespace == "x") == ["x/a", "x/b", "x/d"]
    assert not reachable(lab, "x/a", "x/b")
    assert not reachable(lab, "x/a", "x/d")


# --- names and uids that become paths --------------------------------------------------------------


def test_a_uid_that_is_a_path_creates_nothing_outside_the_lab(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    target = tmp_path / "escaped"
    uid = "x" + "/.." * 12 + str(target)  # out of the cgroup hierarchy, into tmp_path
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: evil\n  namespace: x\n  uid: '{uid}'\n"
    )
    lab = make_lab(manifests_from(three_pods()))
    before = lab.paths.state_file.read_text()
    with pytest.raises(InputError) as info:
        lab.apply(read_manifests([path]))
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 6, "metadata.uid")
    assert not target.exists()
    assert json.loads(lab.paths.state_file.read_text()) == json.loads(before)
    assert_agree(lab)
    other = Lab(lab.name + "u", lab.paths.state_dir)
    with pytest.raises(InputError, match=r"metadata\.uid"):
        other.up(read_manifests([path]))
    assert not other.exists() and not target.exists()
