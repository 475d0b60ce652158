"""The planner: expectations to assignments (pairs, representatives, coverage, the sweep, probe
pods) and the schedule (touched first, retries at once, cadence with jitter, rate limits)."""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest
from make import make_policy, peer, port, rule, sel

from bench.synthetic import make_cluster, make_distinct_cluster, with_expectations
from collector.core.changes import diff_snapshots
from collector.core.classes import ClassModel
from collector.core.engine import Endpoint, endpoint_name
from collector.core.model import (
    ContainerPort,
    Expectations,
    ExternalTarget,
    FlowExpectation,
    HttpCheck,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Pod,
    PodTarget,
    PortSpec,
    Snapshot,
)
from collector.core.planning import build_plan, is_running
from collector.core.probepods import (
    PROBE_POD_LABEL,
    ProbePodRequest,
    is_probe_pod,
    probe_pod_labels,
)
from collector.core.resolving import resolve, select_pods
from collector.core.scheduling import Planner
from collector.core.settings import PlannerSettings
from flowproof.errors import ConfigurationError
from flowproof.probes import ProbeKind, SourceKind


def running(
    ref: str,
    labels: Mapping[str, str] | None = None,
    *,
    ports: Iterable[tuple[int, str]] = ((8080, "TCP"),),
    node: str = "node-1",
    ip: str | None = None,
    phase: str = "Running",
) -> Pod:
    namespace, name = ref.split("/")
    digest = hashlib.sha256(ref.encode()).digest()
    address = ip if ip is not None else f"10.244.{digest[0]}.{digest[1] % 250 + 1}"
    return Pod(
        namespace=namespace,
        name=name,
        labels=dict(labels if labels is not None else {"app": name}),
        ports=tuple(ContainerPort(p, proto) for p, proto in ports),  # type: ignore[arg-type]
        ips=(address,) if address else (),
        uid=f"uid-{name}",
        node=node,
        phase=phase,
    )


def flow(
    name: str,
    source: Mapping[str, str] | PodTarget,
    destination: Mapping[str, str] | PodTarget | ExternalTarget,
    *ports: str,
    expect: str = "allow",
    http: HttpCheck | None = None,
    allow_empty: bool = False,
) -> FlowExpectation:
    def target(value: Mapping[str, str] | PodTarget | ExternalTarget) -> PodTarget | ExternalTarget:
        if isinstance(value, PodTarget | ExternalTarget):
            return value
        return PodTarget(namespace="shop", pod_selector=sel(value))

    specs = []
    for text in ports or ("8080/TCP",):
        number, _, protocol = text.partition("/")
        specs.append(PortSpec(protocol=protocol or "TCP", port=int(number)))  # type: ignore[arg-type]
    source_target = target(source)
    assert isinstance(source_target, PodTarget)
    return FlowExpectation(
        name=name,
        source=source_target,
        destination=target(destination),
        ports=tuple(specs),
        expect=expect,  # type: ignore[arg-type]
        http=http,
        allow_empty=allow_empty,
    )


def cluster(
    pods: Iterable[Pod],
    flows: Iterable[FlowExpectation] = (),
    policies: Iterable[NetworkPolicy] = (),
) -> Snapshot:
    pods = tuple(pods)
    names = {p.namespace for p in pods} | {"shop", "kube-system"}
    return Snapshot(
        namespaces={n: Namespace(n, {"kubernetes.io/metadata.name": n}) for n in sorted(names)},
        pods=pods,
        policies=tuple(policies),
        expectations=(Expectations("shop", "exp", tuple(flows)),),
    )


SETTINGS = PlannerSettings(witnesses=False, sweep_probes_per_second=0)

FRONTEND = running("shop/frontend", {"app": "frontend"}, ports=())
API = running("shop/api", {"app": "api"}, node="node-2")


# --- pairs, kinds and sources ------------------------------------------------------------------


def test_every_pair_is_planned_while_the_flow_is_small() -> None:
    pods = [running(f"shop/fe-{i}", {"app": "frontend"}) for i in range(3)]
    pods += [running(f"shop/api-{i}", {"app": "api"}) for i in range(2)]
    plan = build_plan(
        cluster(pods, [flow("fe-api", {"app": "frontend"}, {"app": "api"})]), SETTINGS
    )
    (declared,) = plan.declared
    assert (declared.pairs_total, declared.pairs_covered, declared.coverage) == (6, 6, 1.0)
    assert len(declared.keys) == 6 and set(declared.keys) == set(plan.flows)
    assert all(plan.flows[k].template is not None for k in declared.keys)


def test_a_large_flow_is_probed_through_one_pair_per_pair_of_classes() -> None:
    gold = [running(f"shop/gold-{i}", {"app": "frontend", "tier": "gold"}) for i in range(5)]
    plain = [running(f"shop/plain-{i}", {"app": "frontend"}) for i in range(5)]
    apis = [running(f"shop/api-{i}", {"app": "api"}) for i in range(10)]
    only_gold = make_policy(
        "api-from-gold",
        "shop",
        selector=sel({"app": "api"}),
        ingress=[rule(peer({"tier": "gold"}), ports=[port(8080)])],
    )
    snapshot = cluster(
        gold + plain + apis, [flow("fe-api", {"app": "frontend"}, {"app": "api"})], [only_gold]
    )
    plan = build_plan(snapshot, SETTINGS)
    (declared,) = plan.declared
    assert (declared.pairs_total, declared.pairs_covered) == (100, 2)
    assert declared.coverage == pytest.approx(0.02)
    chosen = [plan.flows[k] for k in declared.keys]
    assert sorted(f.source.labels.get("tier", "-") for f in chosen) == ["-", "gold"]
    assert sorted(f.model for f in chosen) == [False, True], "one class allowed, one denied"


def test_representatives_per_class_pair_can_be_raised() -> None:
    pods = [running(f"shop/fe-{i}", {"app": "frontend"}) for i in range(5)]
    pods += [running(f"shop/api-{i}", {"app": "api"}) for i in range(5)]
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0, representatives_per_class_pair=3
    )
    plan = build_plan(
        cluster(pods, [flow("fe-api", {"app": "frontend"}, {"app": "api"})]), settings
    )
    assert (plan.declared[0].pairs_total, plan.declared[0].pairs_covered) == (25, 3)


def _oracle(snapshot: Snapshot, settings: PlannerSettings) -> list[tuple[object, ...]]:
    """Every declared flow's keys, pair counts and problems as sorting every pair would give
    them: each concrete flow resolved, the pairs grouped by (source class, destination class),
    the `representatives_per_class_pair` smallest of each kept."""
    model = ClassModel(snapshot)
    index = model.pod_index

    def class_of(endpoint: Endpoint) -> object:
        if not isinstance(endpoint, Pod):
            return ("address", endpoint)
        return ("class", int(model.class_of[index[endpoint.key]]))

    out: list[tuple[object, ...]] = []
    for document in snapshot.expectations:
        for declared in document.flows:
            concrete, problems = resolve(snapshot, document, declared)
            running_sources = {
                p.key
                for p in select_pods(snapshot, declared.source, document.namespace)
                if is_running(p) and not is_probe_pod(p)
            }
            concrete = [
                c
                for c in concrete
                if c.source.key in running_sources
                and not (isinstance(c.destination, Pod) and is_probe_pod(c.destination))
            ]
            pairs = {(c.source.key, endpoint_name(c.destination)): c for c in concrete}
            chosen = set(pairs)
            if len(pairs) > settings.max_pairs_per_flow:
                groups: dict[tuple[object, object], list[tuple[str, str]]] = {}
                for pair, c in pairs.items():
                    groups.setdefault((class_of(c.source), class_of(c.destination)), []).append(
                        pair
                    )
                k = settings.representatives_per_class_pair
                chosen = {pair for members in groups.values() for pair in sorted(members)[:k]}
            keys = tuple(
                dict.fromkeys(
                    c.key
                    for c in concrete
                    if (c.source.key, endpoint_name(c.destination)) in chosen
                )
            )
            out.append((document.key, declared.name, keys, len(pairs), len(chosen), problems))
    return out


@pytest.mark.parametrize("per_class_pair", [1, 2, 3])
@pytest.mark.parametrize("generator", ["repeating", "distinct"])
def test_representatives_are_the_first_pairs_of_each_class_pair_as_sorting_every_pair_gives(
    generator: str, per_class_pair: int
) -> None:
    make = make_cluster if generator == "repeating" else make_distinct_cluster
    snapshot = with_expectations(
        make(400, 8, 40, 5) if generator == "repeating" else make(300, 10, 120, 5), 40, 2
    )
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0, representatives_per_class_pair=per_class_pair
    )
    plan = build_plan(snapshot, settings)
    got = [
        (d.expectation, d.flow, d.keys, d.pairs_total, d.pairs_covered, list(d.problems))
        for d in plan.declared
    ]
    expected = _oracle(snapshot, settings)
    assert got == expected
    assert sum(1 for d in plan.declared if d.pairs_covered < d.pairs_total) >= 10, "sampled"


DNS_POD = running("kube-system/coredns", {"k8s-app": "kube-dns"}, ports=((53, "UDP"), (53, "TCP")))


@pytest.mark.parametrize(
    ("declared", "kind", "address", "responder", "extra"),
    [
        pytest.param(
            flow("f", {"app": "frontend"}, {"app": "api"}, "8080/TCP"),
            ProbeKind.TCP,
            API.ips[0],
            False,
            {},
            id="a TCP port the destination declares needs no responder",
        ),
        pytest.param(
            flow("f", {"app": "frontend"}, {"app": "api"}, "9090/TCP"),
            ProbeKind.TCP,
            API.ips[0],
            True,
            {},
            id="a port the destination does not declare gets a responder on its node",
        ),
        pytest.param(
            flow("f", {"app": "frontend"}, {"app": "api"}, "5353/UDP"),
            ProbeKind.UDP,
            API.ips[0],
            True,
            {},
            id="UDP probes get a responder too, so the nonce comes back",
        ),
        pytest.param(
            flow("f", {"app": "frontend"}, {"app": "api"}, "7000/SCTP"),
            ProbeKind.SCTP,
            API.ips[0],
            True,
            {},
            id="SCTP ports are probed as SCTP",
        ),
        pytest.param(
            flow("f", {"app": "frontend"}, {"app": "api"}, http=HttpCheck("/healthz", (200,))),
            ProbeKind.HTTP,
            API.ips[0],
            False,
            {"http_path": "/healthz"},
            id="a flow with http is an HTTP probe of its path",
        ),
        pytest.param(
            flow("f", {"app": "frontend"}, ExternalTarget(dns="cluster"), "53/UDP"),
            ProbeKind.DNS,
            "10.96.0.10",
            False,
            {"dns_query_name": "kubernetes.default.svc.cluster.local"},
            id="dns: cluster queries a name at the cluster DNS address",
        ),
        pytest.param(
            flow(
                "f",
                {"app": "frontend"},
                ExternalTarget(cidr=ipaddress.ip_network("203.0.113.0/24")),
                "443/TCP",
            ),
            ProbeKind.TCP,
            "203.0.113.1",
            False,
            {"destination": None},
            id="a CIDR destination is probed at its first host, without responder",
        ),
    ],
)
def test_assignment_templates(
    declared: FlowExpectation,
    kind: ProbeKind,
    address: str,
    responder: bool,
    extra: dict[str, object],
) -> None:
    plan = build_plan(cluster([FRONTEND, API, DNS_POD], [declared]), SETTINGS)
    (key,) = plan.declared[0].keys
    template = plan.flows[key].template
    assert template is not None
    assert template.problems() == ["empty assignment id"]
    assert (template.kind, template.destination_ip) == (kind, address)
    assert (template.source.uid, template.source_node) == ("uid-frontend", "node-1")
    assert template.source_kind is SourceKind.POD
    assert template.flow_key == key
    assert template.timeout_seconds == SETTINGS.probe_timeout_seconds
    assert (template.responder is not None) == responder
    if template.responder is not None:
        assert (template.responder.pod.uid, template.responder.node) == ("uid-api", "node-2")
    assert plan.flows[key].listener_declared == (not responder and template.destination is not None)
    for name, value in extra.items():
        assert getattr(template, name) == value


def test_http_expect_status_is_carried_to_the_planned_flow() -> None:
    declared = flow("f", {"app": "frontend"}, {"app": "api"}, http=HttpCheck("/", (200, 204)))
    plan = build_plan(cluster([FRONTEND, API], [declared]), SETTINGS)
    assert next(iter(plan.flows.values())).expect_status == (200, 204)


def test_only_running_pods_with_an_ip_on_a_node_are_sources() -> None:
    pods = [
        running("shop/fe-ok", {"app": "frontend"}),
        running("shop/fe-pending", {"app": "frontend"}, phase="Pending"),
        running("shop/fe-noip", {"app": "frontend"}, ip=""),
        running("shop/fe-nonode", {"app": "frontend"}, node=""),
        API,
    ]
    plan = build_plan(cluster(pods, [flow("f", {"app": "frontend"}, {"app": "api"})]), SETTINGS)
    assert {plan.flows[k].source.name for k in plan.declared[0].keys} == {"fe-ok"}
    assert plan.probe_pods == ()


def test_a_flow_whose_from_matches_no_running_pod_requests_a_probe_pod() -> None:
    declared = flow("f", {"app": "batch"}, {"app": "api"})
    plan = build_plan(cluster([API], [declared]), SETTINGS)
    (request,) = plan.probe_pods
    assert request.namespace == "shop"
    assert request.label_map() == {"app": "batch", PROBE_POD_LABEL: "true"}
    assert plan.declared[0].probe_pod == request
    (key,) = plan.declared[0].keys
    planned = plan.flows[key]
    assert planned.template is None
    assert planned.unprobeable == f"no running source pod: probe pod {request.key} requested"
    assert planned.model is True, "the model is known before the probe pod runs"

    # The lab starts the probe pod under the requested name: same flow key, now probeable.
    started = replace(
        running(f"shop/{request.name}", request.label_map(), ports=()), uid="uid-probe"
    )
    plan = build_plan(cluster([API, started], [declared]), SETTINGS)
    assert plan.probe_pods == ()
    template = plan.flows[key].template
    assert template is not None
    assert (template.source_kind, template.source.uid) == (SourceKind.PROBE_POD, "uid-probe")


def test_real_pods_are_preferred_to_probe_pods_and_probe_pods_are_never_destinations() -> None:
    probe = running("shop/flowproof-probe-x", {"app": "frontend", PROBE_POD_LABEL: "true"})
    real = running("shop/fe", {"app": "frontend"})
    declared = [
        flow("fe-api", {"app": "frontend"}, {"app": "api"}),
        flow("any-to-fe", PodTarget(namespace="shop"), {"app": "frontend"}),
    ]
    plan = build_plan(cluster([probe, real, API], declared), SETTINGS)
    sources = {plan.flows[k].source.name for k in plan.declared[0].keys}
    destinations = {plan.flows[k].destination_name for k in plan.declared[1].keys}
    assert sources == {"fe"}
    assert destinations == {"shop/fe"}


@pytest.mark.parametrize(
    ("selector", "labels"),
    [
        pytest.param(sel({"app": "a"}), {"app": "a"}, id="matchLabels are copied"),
        pytest.param(
            sel(None, ("tier", "In", ("web", "api"))),
            {"tier": "api"},
            id="In takes the first value in sorted order",
        ),
        pytest.param(
            sel(None, ("tier", "Exists", ())),
            {"tier": "flowproof-probe"},
            id="Exists gets a placeholder value",
        ),
        pytest.param(
            sel({"app": "a"}, ("tier", "NotIn", ("x",))),
            {"app": "a"},
            id="NotIn and DoesNotExist are met by leaving the key out",
        ),
        pytest.param(
            sel({"app": "a"}, ("app", "DoesNotExist", ())),
            None,
            id="a selector nothing can satisfy gives no probe pod",
        ),
    ],
)
def test_probe_pod_labels(selector: LabelSelector, labels: dict[str, str] | None) -> None:
    expected = None if labels is None else {**labels, PROBE_POD_LABEL: "true"}
    assert probe_pod_labels(selector) == expected


def test_probe_pod_names_are_stable_and_distinct() -> None:
    a = ProbePodRequest("shop", (("app", "a"),))
    assert a.name == ProbePodRequest("shop", (("app", "a"),)).name
    assert a.name != ProbePodRequest("shop", (("app", "b"),)).name
    assert a.name.startswith("flowproof-probe-") and len(a.name) <= 63


def test_a_flow_that_resolves_to_nothing_says_why() -> None:
    plan = build_plan(
        cluster([FRONTEND], [flow("f", {"app": "frontend"}, {"app": "nope"})]), SETTINGS
    )
    assert plan.declared[0].keys == ()
    assert any("matches no pod" in p for p in plan.declared[0].problems)
    empty = build_plan(
        cluster([FRONTEND], [flow("f", {"app": "frontend"}, {"app": "nope"}, allow_empty=True)]),
        SETTINGS,
    )
    assert empty.declared[0].problems == ()


# --- the truth-table sweep ---------------------------------------------------------------------


def sweep_cluster() -> Snapshot:
    pods = [running(f"shop/web-{i}", {"app": "web"}, ports=((80, "TCP"),)) for i in range(4)]
    pods += [running(f"shop/db-{i}", {"app": "db"}, ports=((5432, "TCP"),)) for i in range(4)]
    pods += [running("shop/job", {"app": "job"}, ports=())]
    db_from_web = make_policy(
        "db", "shop", selector=sel({"app": "db"}), ingress=[rule(peer({"app": "web"}))]
    )
    declared = [flow("web-db", {"app": "web"}, {"app": "db"}, "5432/TCP")]
    return cluster(pods, declared, [db_from_web])


def sweep_planner(rate: float = 1.0, random_fraction: float = 0.0) -> Planner:
    settings = PlannerSettings(
        witnesses=False,
        sweep_probes_per_second=rate,
        sweep_random_fraction=random_fraction,
        interval_seconds=2.0,
        freshness_seconds=10.0,
    )
    planner = Planner(settings, seed=1)
    planner.update(sweep_cluster(), None, 0.0)
    return planner


def test_the_sweep_walks_every_cell_of_the_truth_table_once_per_turn() -> None:
    planner = sweep_planner()
    table = planner.plan.sweep
    assert table is not None
    # 3 classes (web, db, job) as sources x 2 (class, declared port) targets.
    assert table.size == 6
    seen: list[str] = []
    now = 0.0
    for _ in range(3):  # a batch of 2 (1/s x 2 s) per turn of the cadence
        update = planner.rotate_sweep(now)
        assert update is not None
        assert len(update.added) == 2
        seen += sorted(update.added)
        assert not (update.removed & update.added)
        now += 2.0
    cells = {planner.plan.flows.get(k).cell if k in planner.plan.flows else k for k in seen}
    assert len(set(seen)) == 6, "every cell once before any cell twice"
    assert all(k.startswith("sweep:") for k in seen)
    assert cells


def test_sweep_flows_take_the_model_as_intent_and_say_which_cell() -> None:
    planner = sweep_planner(rate=3.0)
    planner.rotate_sweep(0.0)
    sweep = [f for f in planner.plan.flows.values() if f.kind == "sweep"]
    assert len(sweep) == 6
    for f in sweep:
        assert f.intent == f.model, "a sweep flow's intent is the model"
        assert f.cell and f.key == f"sweep:{f.cell}"
        assert f.source.key != f.destination_name
        assert f.listener_declared and f.template is not None
    assert Counter(f.model for f in sweep) == {True: 4, False: 2}, "job and db -> db are denied"


def test_the_sweep_is_not_due_before_its_interval_and_keeps_failing_cells() -> None:
    planner = sweep_planner()
    first = planner.rotate_sweep(0.0)
    assert first is not None
    assert planner.rotate_sweep(1.0) is None and not planner.sweep_due(1.0)
    kept = sorted(first.added)[0]
    second = planner.rotate_sweep(2.0, keep=[kept])
    assert second is not None
    assert kept not in second.removed and kept in planner.plan.flows
    assert second.removed == first.added - {kept}


def test_a_share_of_each_batch_is_drawn_at_random() -> None:
    planner = sweep_planner(rate=2.0, random_fraction=0.5)
    update = planner.rotate_sweep(0.0)
    assert update is not None
    subjects = [planner.plan.flows[k].subject for k in update.added]
    assert any(s.startswith("random pick") for s in subjects)
    assert any(not s.startswith("random pick") for s in subjects)


def test_a_new_snapshot_keeps_the_current_batch_judged_anew() -> None:
    planner = sweep_planner()
    update = planner.rotate_sweep(0.0)
    assert update is not None
    keys = set(update.added)
    planner.update(sweep_cluster(), None, 1.0)
    assert keys <= set(planner.plan.flows), "the batch survives a replan"


# --- schedule ----------------------------------------------------------------------------------


def two_flows() -> Snapshot:
    pods = [FRONTEND, API, running("shop/db", {"app": "db"}, ports=((5432, "TCP"),), node="node-3")]
    declared = [
        flow("fe-api", {"app": "frontend"}, {"app": "api"}),
        flow("fe-db", {"app": "frontend"}, {"app": "db"}, "5432/TCP", expect="deny"),
    ]
    return cluster(pods, declared)


def start(snapshot: Snapshot, settings: PlannerSettings = SETTINGS, now: float = 1000.0) -> Planner:
    planner = Planner(settings, seed=1, id_prefix="t")
    planner.update(snapshot, diff_snapshots(None, snapshot, generation=1, at=now), now)
    return planner


def test_the_first_plan_sends_every_declared_flow_at_once_then_on_a_jittered_cadence() -> None:
    planner = start(two_flows())
    first = planner.due(1000.0)
    assert len(first) == 2 and len({a.id for a in first}) == 2
    assert all(a.id.startswith("t-") for a in first)
    assert {a.attempt for a in first} == {1}
    assert planner.due(1000.0) == [], "nothing again before the interval"
    for a in first:
        assert planner.completed(a.id) == a.flow_key
    assert planner.due(1000.0 + 10 * 0.8 - 0.01) == []
    again = planner.due(1000.0 + 10 * 1.2 + 0.01)
    assert sorted(a.flow_key for a in again) == sorted(a.flow_key for a in first)
    assert {a.id for a in again}.isdisjoint({a.id for a in first})


def test_jitter_spreads_the_cadence_within_bounds() -> None:
    pods = [running(f"shop/fe-{i}", {"app": "frontend"}) for i in range(8)] + [API]
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0, max_per_destination_per_second=100
    )
    planner = start(cluster(pods, [flow("f", {"app": "frontend"}, {"app": "api"})]), settings)
    for a in planner.due(1000.0):
        planner.completed(a.id)
    times = []
    now = 1000.0
    while now < 1013.0:
        now += 0.05
        times += [now - 1000.0 for _ in planner.due(now)]
    assert len(times) == 8
    assert all(8.0 <= t <= 12.05 for t in times)
    assert max(times) - min(times) > 0.5, "not all at once"


def test_a_retry_goes_out_at_once_with_its_attempt_number() -> None:
    planner = start(two_flows())
    first = planner.due(1000.0)
    planner.completed(first[0].id)
    planner.retry(first[0].flow_key, attempt=2)
    (retry,) = planner.due(1000.1)
    assert (retry.flow_key, retry.attempt) == (first[0].flow_key, 2)
    assert planner.stats.retries_total == 1


def test_touched_flows_go_first_and_untouched_ones_keep_their_schedule() -> None:
    snapshot = two_flows()
    planner = start(snapshot)
    for a in planner.due(1000.0):
        planner.completed(a.id)
    # A policy that closes api: only fe-api's verdict changes.
    deny_api = make_policy("deny-api", "shop", selector=sel({"app": "api"}), types=["ingress"])
    changed = replace(snapshot, policies=(deny_api,))
    change = diff_snapshots(snapshot, changed, generation=2, at=1003.0)
    update = planner.update(changed, change, 1003.0)
    fe_api = next(k for k in update.plan.flows if "/fe-api:" in k)
    assert update.touched == {fe_api}
    assert update.added == update.removed == frozenset()
    (sent,) = planner.due(1003.0)
    assert sent.flow_key == fe_api


def test_a_touched_flow_is_probed_again_once_the_change_has_settled() -> None:
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0.0, settle_seconds=1.0, interval_seconds=10.0
    )
    snapshot = two_flows()
    planner = start(snapshot, settings)
    for a in planner.due(1000.0):
        planner.completed(a.id)
    deny_api = make_policy("deny-api", "shop", selector=sel({"app": "api"}), types=["ingress"])
    changed = replace(snapshot, policies=(deny_api,))
    update = planner.update(
        changed, diff_snapshots(snapshot, changed, generation=2, at=1003.0), 1003.0
    )
    (first,) = planner.due(1003.0)
    planner.completed(first.id)
    assert planner.due(1003.9) == [], "not before the change has settled"
    (again,) = planner.due(1004.0)
    assert again.flow_key == first.flow_key and update.touched == {first.flow_key}
    planner.completed(again.id)
    assert planner.due(1005.0) == [], "then the cadence, not another settle probe"
    early = planner.due(1004.0 + 7.9)  # the cadence is 10 s ± 20 %
    assert first.flow_key not in [a.flow_key for a in early]
    for a in early:
        planner.completed(a.id)
    assert first.flow_key in [a.flow_key for a in planner.due(1004.0 + 12.1)]


def test_the_settle_probe_waits_for_a_retry_in_flight_then_goes() -> None:
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0.0, settle_seconds=1.0, interval_seconds=10.0
    )
    snapshot = two_flows()
    planner = start(snapshot, settings)
    for a in planner.due(1000.0):
        planner.completed(a.id)
    deny_api = make_policy("deny-api", "shop", selector=sel({"app": "api"}), types=["ingress"])
    changed = replace(snapshot, policies=(deny_api,))
    planner.update(changed, diff_snapshots(snapshot, changed, generation=2, at=1003.0), 1003.0)
    (first,) = planner.due(1003.0)
    planner.completed(first.id)
    planner.retry(first.flow_key, attempt=2)  # a mismatch, confirmed before it is reported
    (retry,) = planner.due(1003.5)
    assert planner.settling(first.flow_key)
    assert planner.due(1004.0) == [], "the retry is still in flight"
    assert planner.next_wakeup(1004.0) != 1004.0, "and the sender does not spin on it"
    planner.completed(retry.id)
    (settled,) = planner.due(1004.2)
    assert (settled.flow_key, settled.attempt) == (first.flow_key, 1)
    assert not planner.settling(first.flow_key)


def test_without_settling_a_touched_flow_waits_for_its_cadence() -> None:
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0.0, settle_seconds=0.0, interval_seconds=10.0
    )
    snapshot = two_flows()
    planner = start(snapshot, settings)
    for a in planner.due(1000.0):
        planner.completed(a.id)
    deny_api = make_policy("deny-api", "shop", selector=sel({"app": "api"}), types=["ingress"])
    changed = replace(snapshot, policies=(deny_api,))
    planner.update(changed, diff_snapshots(snapshot, changed, generation=2, at=1003.0), 1003.0)
    (first,) = planner.due(1003.0)
    planner.completed(first.id)
    assert planner.due(1004.0) == []


def test_flows_that_disappear_are_dropped_and_never_sent() -> None:
    snapshot = two_flows()
    planner = start(snapshot)
    without_db = replace(snapshot, pods=tuple(p for p in snapshot.pods if p.name != "db"))
    update = planner.update(
        without_db, diff_snapshots(snapshot, without_db, generation=2, at=1000.0), 1000.0
    )
    assert len(update.removed) == 1
    assert all("db" not in a.flow_key for a in planner.due(1000.0))
    later = [a for t in range(1, 40) for a in planner.due(1000.0 + t)]
    assert later and all("db" not in a.flow_key for a in later)


def test_a_flow_in_flight_is_not_sent_again_until_its_result_or_its_deadline() -> None:
    settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0, result_grace_seconds=20.0, freshness_seconds=60
    )
    planner = start(two_flows(), settings)
    first = planner.due(1000.0)
    assert planner.in_flight == 2
    assert planner.due(1000.0 + 12.5) == [], "still in flight at the next cadence"
    # timeout 2 s + grace 20 s: lost at 1022 and sent again.
    again = planner.due(1022.0)
    assert sorted(a.flow_key for a in again) == sorted(a.flow_key for a in first)
    assert planner.stats.lost_total == 2
    assert planner.completed(first[0].id) is None, "a lost assignment's late result is unknown"
    assert sorted(planner.take_lost()) == sorted(a.id for a in first), "handed on to forget"
    assert planner.take_lost() == [], "each lost id is handed on once"


@pytest.mark.parametrize(
    ("settings", "sources", "same_destination", "expected"),
    [
        pytest.param(
            PlannerSettings(witnesses=False, sweep_probes_per_second=0, max_per_node_per_second=3),
            [running(f"shop/fe-{i}", {"app": "frontend"}, node="node-1") for i in range(10)],
            False,
            3,
            id="at most max_per_node_per_second from one source node",
        ),
        pytest.param(
            PlannerSettings(
                witnesses=False, sweep_probes_per_second=0, max_per_destination_per_second=4
            ),
            [running(f"shop/fe-{i}", {"app": "frontend"}, node=f"n{i}") for i in range(10)],
            True,
            4,
            id="at most max_per_destination_per_second towards one destination",
        ),
    ],
)
def test_rate_limits_hold_back_and_keep_the_rest_queued(
    settings: PlannerSettings, sources: list[Pod], same_destination: bool, expected: int
) -> None:
    destinations = (
        [API] if same_destination else [running(f"shop/api-{i}", {"app": "api"}) for i in range(10)]
    )
    pairs = [flow("f", {"app": "frontend"}, {"app": "api"})]
    settings = replace(settings, max_pairs_per_flow=1000)
    planner = start(cluster(sources + destinations, pairs), settings)
    assert len(planner.due(1000.0)) == expected
    assert planner.due(1000.0) == []
    assert planner.next_wakeup(1000.0) == 1000.0, "the held-back flows are still urgent"
    assert len(planner.due(1001.0)) == expected, "one second later, one more second's worth"


def test_expedite_queues_every_declared_flow() -> None:
    planner = start(two_flows())
    for a in planner.due(1000.0):
        planner.completed(a.id)
    assert planner.expedite() == 2
    assert len(planner.due(1000.5)) == 2


def test_next_wakeup_is_the_earliest_cadence_time() -> None:
    planner = start(two_flows())
    for a in planner.due(1000.0):
        planner.completed(a.id)
    wake = planner.next_wakeup(1000.0)
    assert wake is not None and 1008.0 <= wake <= 1012.0
    assert planner.due(wake)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"interval_seconds": 0}, "interval_seconds must be positive", id="a zero interval"
        ),
        pytest.param({"jitter_fraction": 1.0}, "jitter_fraction", id="jitter of 100%"),
        pytest.param({"max_pairs_per_flow": 0}, "max_pairs_per_flow", id="no pairs per flow"),
        pytest.param(
            {"freshness_seconds": 12.0},
            "freshness_seconds",
            id="freshness shorter than the gap between two results",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PlannerSettings(**overrides)  # type: ignore[arg-type]
