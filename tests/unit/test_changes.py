"""Change tracking: what a new snapshot changed, and which flows the change touches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from make import make_policy, peer, port, rule, sel
from test_planning import cluster, flow, running

from collector.core.changes import ChangeEvent, FlowFacts, diff_snapshots, touched_flows
from collector.core.model import Expectations, Namespace, PodTarget, Snapshot
from collector.core.scheduling import Planner
from collector.core.settings import PlannerSettings

FE = running("shop/fe", {"app": "frontend"}, ports=())
API = running("shop/api", {"app": "api"})
DB = running("shop/db", {"app": "db"}, ports=((5432, "TCP"),))
OTHER = running("other/web", {"app": "web"}, ports=((80, "TCP"),))
API_FROM_FE = make_policy(
    "api", "shop", selector=sel({"app": "api"}), ingress=[rule(peer({"app": "frontend"}))]
)
FLOWS = [
    flow("fe-api", {"app": "frontend"}, {"app": "api"}),
    flow("fe-db", {"app": "frontend"}, {"app": "db"}, "5432/TCP", expect="deny"),
    flow(
        "fe-web",
        {"app": "frontend"},
        PodTarget(namespace="other", pod_selector=sel({"app": "web"})),
        "80/TCP",
    ),
]
BASE = cluster([FE, API, DB, OTHER], FLOWS, [API_FROM_FE])


def with_pod(snapshot: Snapshot, name: str, **changes: object) -> Snapshot:
    pods = tuple(replace(p, **changes) if p.name == name else p for p in snapshot.pods)  # type: ignore[arg-type]
    return replace(snapshot, pods=pods)


Edit = Callable[[Snapshot], Snapshot]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda s: with_pod(s, "api", labels={"app": "api", "v": "2"}),
            {"pods_changed": {"shop/api"}},
            id="a pod's labels changed",
        ),
        pytest.param(
            lambda s: with_pod(s, "api", ips=("10.244.9.9",)),
            {"pods_changed": {"shop/api"}},
            id="a pod's IP changed",
        ),
        pytest.param(
            lambda s: replace(s, pods=(*s.pods, running("shop/api-2", {"app": "api"}))),
            {"pods_added": {"shop/api-2"}},
            id="a pod was added",
        ),
        pytest.param(
            lambda s: replace(s, pods=tuple(p for p in s.pods if p.name != "db")),
            {"pods_removed": {"shop/db"}},
            id="a pod was removed",
        ),
        pytest.param(
            lambda s: replace(s, policies=()),
            {"policies_removed": {"shop/api"}},
            id="a policy was removed",
        ),
        pytest.param(
            lambda s: replace(s, policies=(replace(API_FROM_FE, ingress=()),)),
            {"policies_changed": {"shop/api"}},
            id="a policy's rules changed",
        ),
        pytest.param(
            lambda s: replace(s, policies=(replace(API_FROM_FE, source="elsewhere.yaml:40"),)),
            {},
            id="a policy read from another line is not a change",
        ),
        pytest.param(
            lambda s: replace(
                s,
                namespaces={**s.namespaces, "other": Namespace("other", {"team": "x"})},
            ),
            {"namespaces_changed": {"other"}},
            id="a namespace's labels changed",
        ),
        pytest.param(
            lambda s: replace(
                s, expectations=(replace(s.expectations[0], flows=tuple(FLOWS[:1])),)
            ),
            {"expectations_changed": {"shop/exp"}},
            id="an expectations document changed",
        ),
        pytest.param(
            lambda s: replace(s, expectations=(*s.expectations, Expectations("other", "more", ()))),
            {"expectations_added": {"other/more"}},
            id="an expectations document was added",
        ),
    ],
)
def test_diff_snapshots(edit: Edit, expected: dict[str, set[str]]) -> None:
    change = diff_snapshots(BASE, edit(BASE), generation=2, at=5.0, observed_at=6.0)
    assert (change.generation, change.at, change.observed_at, change.initial) == (
        2,
        5.0,
        6.0,
        False,
    )
    found = {
        name: set(getattr(change, name))
        for name in ChangeEvent.__dataclass_fields__
        if name not in ("generation", "at", "observed_at", "initial") and getattr(change, name)
    }
    assert found == expected
    assert change.empty == (not expected)


def test_the_first_snapshot_is_an_initial_change_adding_everything() -> None:
    change = diff_snapshots(None, BASE, generation=1, at=1.0)
    assert change.initial and change.observed_at == 1.0
    assert change.pods_added == {"shop/fe", "shop/api", "shop/db", "other/web"}
    assert change.policies_added == {"shop/api"}
    assert change.describe().startswith("initial snapshot: 4 pods, 1 policies")


def test_describe_names_what_changed() -> None:
    edited = with_pod(replace(BASE, policies=()), "api", labels={"app": "api2"})
    text = diff_snapshots(BASE, edited, generation=2, at=0.0).describe()
    assert text == "pod shop/api changed; policy shop/api removed"
    assert diff_snapshots(BASE, BASE, generation=2, at=0.0).describe() == "no change"


def test_touched_flows_follows_facts_and_moved_pods() -> None:
    facts = {
        "a": FlowFacts("ns/x", "ns/y", "1"),
        "b": FlowFacts("ns/x", "ns/z", "1"),
        "c": FlowFacts("ns/w", "ns/v", "1"),
    }
    after = {**facts, "b": FlowFacts("ns/x", "ns/z", "2"), "d": FlowFacts("ns/q", "ns/r", "1")}
    change = ChangeEvent(generation=2, at=0.0, observed_at=0.0, pods_changed=frozenset({"ns/v"}))
    assert touched_flows(change, facts, after) == {"b", "c", "d"}
    assert touched_flows(None, facts, after) == {"b", "d"}


def touched_by(edit: Edit) -> set[str]:
    """Flow names (`fe-api`, ...) a change touches, through the planner's real plans."""
    planner = Planner(PlannerSettings(witnesses=False, sweep_probes_per_second=0), seed=1)
    planner.update(BASE, diff_snapshots(None, BASE, generation=1, at=0.0), 0.0)
    after = edit(BASE)
    update = planner.update(after, diff_snapshots(BASE, after, generation=2, at=1.0), 1.0)
    return {update.plan.flows[k].flow for k in update.touched}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda s: with_pod(s, "db", labels={"app": "db", "v": "2"}),
            {"fe-db"},
            id="a label change touches the flows of that pod even when no verdict changes",
        ),
        pytest.param(
            lambda s: with_pod(s, "fe", labels={"app": "frontend", "v": "2"}),
            {"fe-api", "fe-db", "fe-web"},
            id="a label change of a source touches all its flows",
        ),
        pytest.param(
            lambda s: with_pod(s, "web", ips=("10.244.7.7",)),
            {"fe-web"},
            id="an IP change touches the flows of that pod",
        ),
        pytest.param(
            lambda s: replace(s, policies=()),
            {"fe-api"},
            id="removing a policy touches the flows whose explanation named it",
        ),
        pytest.param(
            lambda s: replace(
                s,
                policies=(
                    *s.policies,
                    make_policy("deny-db", "shop", selector=sel({"app": "db"}), types=["ingress"]),
                ),
            ),
            {"fe-db"},
            id="a new policy touches the flows whose verdict or explanation it changes",
        ),
        pytest.param(
            lambda s: replace(
                s,
                policies=(
                    make_policy(
                        "api",
                        "shop",
                        selector=sel({"app": "api"}),
                        ingress=[rule(peer({"app": "frontend"}), ports=[port(8080)])],
                    ),
                ),
            ),
            {"fe-api"},
            id="a policy edit touches flows whose explanation changed though the verdict did not",
        ),
        pytest.param(
            lambda s: replace(
                s,
                policies=(
                    *s.policies,
                    make_policy("other-deny", "other", selector=sel({"app": "nothing"})),
                ),
            ),
            set(),
            id="a policy that selects none of the flows' pods touches nothing",
        ),
        pytest.param(
            lambda s: replace(
                s,
                expectations=(
                    replace(
                        s.expectations[0],
                        flows=(FLOWS[0], replace(FLOWS[1], expect="allow"), FLOWS[2]),
                    ),
                ),
            ),
            {"fe-db"},
            id="a changed intent touches that flow",
        ),
        pytest.param(
            lambda s: replace(s, pods=(*s.pods, running("shop/api-2", {"app": "api"}))),
            {"fe-api"},
            id="a new pod's flows are touched (new flows)",
        ),
        pytest.param(lambda s: s, set(), id="no change touches nothing"),
    ],
)
def test_what_a_change_touches(edit: Edit, expected: set[str]) -> None:
    assert touched_by(edit) == expected
