"""What the collector writes to a cluster: its probe pods, the status of FlowExpectations (with
the conditions Verified and Ready) and the Events of their transitions.

Glue between the runtime, the flow state and collector.kube, which makes every request; this module
never imports `kubernetes`. It creates and deletes only pods labelled as flowproof's probe pods, only
in `probe_pod_namespaces`, writes only the `/status` of FlowExpectations custom resources, and
creates only Events about them. An API error is logged (once per distinct reason) and retried later
(an Event is not retried); it never ends a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from collector.core.evidence import PolicyEvidence
from collector.core.flowstate import DeclaredStatus
from collector.core.probepods import (
    MANAGED_BY_LABEL,
    PROBE_POD_LABEL,
    PROBE_POD_PREFIX,
    ProbePodRequest,
)
from collector.core.statuses import FAILING, STATUS_ORDER, Status, status_rank
from collector.kube import (
    FLOWEXPECTATIONS_GROUP,
    FLOWEXPECTATIONS_VERSION,
    ExpectationsObject,
    KubeApiError,
    KubeClient,
    KubeConfiguration,
    KubernetesSource,
    KubeSourceSettings,
    PodSummary,
)
from collector.loop import Collector, LoopEvent, SnapshotApplied, StatusChanged
from collector.settings import CollectorSettings
from flowproof.aio import first_of

log = logging.getLogger(__name__)

MANAGED_BY: Final = "flowproof"
NEVER_READY_CONDITION: Final = "flowproof.dev/never-ready"
"""The readiness gate of every probe pod: nobody sets this condition, so the pod is never Ready
and no Service sends it traffic."""
PROBE_POD_SELECTOR: Final = f"{MANAGED_BY_LABEL}={MANAGED_BY},{PROBE_POD_LABEL}=true"
PROBE_POD_USER: Final = 65535  # the pause image's own user
MAX_STATUS_FAILURES: Final = 100
MAX_STATUS_TEXT: Final = 1000
STATUS_FIELDS: Final = (
    "observedGeneration",
    "lastVerified",
    "flows",
    "failing",
    "counts",
    "failures",
    "problem",
    "conditions",
)
"""Every field of FlowExpectations status the collector writes (deploy/crds)."""


# --- probe pods -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerReference:
    """The owner named in a probe pod: a FlowExpectations in the pod's namespace or the
    Namespace itself (an owner in another namespace is invalid: the garbage collector would
    delete the pod at once)."""

    api_version: str
    kind: str
    name: str
    uid: str

    def to_dict(self, *, controller: bool) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": controller,
        }


def probe_pod_manifest(
    request: ProbePodRequest, *, image: str, owners: Sequence[OwnerReference]
) -> dict[str, Any]:
    """The pod that stands for `request`: one container, no sidecar, no token, never Ready.

    The first owner is its controller, so no ReplicaSet or StatefulSet whose selector matches its
    labels adopts it. It passes Pod Security "restricted" and deploy/overlays/probe-pods'
    admission policy.
    """
    if not owners:
        raise ValueError("a probe pod needs an owner")
    labels = {**request.label_map(), PROBE_POD_LABEL: "true", MANAGED_BY_LABEL: MANAGED_BY}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": request.name,
            "namespace": request.namespace,
            "labels": labels,
            "annotations": {
                "kubernetes.io/description": (
                    "flowproof probe pod: flowproof's agent sends probes from its network "
                    "namespace for flows whose `from` matches no running pod. Never Ready; "
                    "the collector deletes it when no flow needs it."
                )
            },
            "ownerReferences": [owner.to_dict(controller=i == 0) for i, owner in enumerate(owners)],
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "readinessGates": [{"conditionType": NEVER_READY_CONDITION}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "nodeSelector": {"kubernetes.io/os": "linux"},  # where the agents run
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": PROBE_POD_USER,
                "runAsGroup": PROBE_POD_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "requests": {"cpu": "1m", "memory": "8Mi"},
                        "limits": {"cpu": "10m", "memory": "16Mi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def probe_pod_refusal(request: ProbePodRequest, namespaces: Iterable[str]) -> str | None:
    """Why no probe pod may be made for `request`, or None when one may."""
    allowed = sorted(set(namespaces))
    if request.namespace not in allowed:
        return (
            f"namespace {request.namespace!r} is not in probe_pod_namespaces "
            f"({', '.join(allowed) or 'none'})"
        )
    labels = request.label_map()
    for key, value in ((MANAGED_BY_LABEL, MANAGED_BY), (PROBE_POD_LABEL, "true")):
        if labels.get(key, value) != value:
            return f"its pods need label {key}={labels[key]}, and a probe pod carries {key}={value}"
    return None


ExpectationsNeeding = Callable[[ProbePodRequest], Sequence[str]]
"""The FlowExpectations ("ns/name") whose flows need a probe pod."""


def expectations_needing(collector: Collector) -> ExpectationsNeeding:
    """The documents of the collector's current plan that asked for a probe pod."""

    def needing(request: ProbePodRequest) -> list[str]:
        plans = collector.planner.plan.declared
        return sorted({p.expectation for p in plans if p.probe_pod == request})

    return needing


class KubernetesProbePods:
    """The collector's probe pods in a cluster, reconciled with the requested ones.

    Called (as the runtime's ProbePodManager) with every probe pod the plan needs; `run(stop)`
    (a root task) then creates the missing ones, deletes those no longer needed, looks again
    every `resync_seconds` (a probe pod someone deleted comes back), and deletes every probe pod
    when `stop` is set. A request outside the allowed namespaces is refused with a logged reason,
    and its flows stay INCONCLUSIVE (they have no source). See `probe_pod_manifest` for the pod
    and `OwnerReference` for its owner: the FlowExpectations custom resources in the pod's
    namespace that need it (`needed_by`), else the pod's Namespace.
    """

    def __init__(
        self,
        client: KubeClient,
        *,
        namespaces: Iterable[str],
        image: str,
        needed_by: ExpectationsNeeding | None = None,
        resync_seconds: float = 30.0,
        retry_seconds: float = 5.0,
        stop_timeout_seconds: float = 5.0,
    ) -> None:
        self.client = client
        self.namespaces = frozenset(namespaces)
        self.image = image
        self.needed_by = needed_by
        """Set after construction when the collector that plans is built later."""
        self.resync_seconds = resync_seconds
        self.retry_seconds = retry_seconds
        self.stop_timeout_seconds = stop_timeout_seconds
        self._desired: dict[str, ProbePodRequest] | None = None  # None: not told yet
        self._known: dict[str, str] = {}  # probe pods seen or made: key -> uid
        self._problems: dict[str, str] = {}
        self._logged: dict[str, str] = {}  # what was last logged per pod, so each reason is once
        self._list_failure: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one pass at a time
        self.passes = 0
        """Reconcile passes completed."""

    @property
    def problems(self) -> Mapping[str, str]:
        """Probe pods that are not as the plan needs them (refused, not created, not deleted),
        and why: "ns/name" -> reason."""
        return dict(self._problems)

    async def __call__(self, requests: Sequence[ProbePodRequest]) -> None:
        """Every probe pod the plan needs now (the rest are deleted); returns at once."""
        self._desired = {r.key: r for r in requests}
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile on every call and every `resync_seconds` until `stop`; then delete all."""
        try:
            delay = self.resync_seconds
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await first_of(self._wake, stop)
                if stop.is_set():
                    break
                self._wake.clear()
                if self._desired is None:
                    delay = self.resync_seconds
                    continue
                try:
                    settled = await self.reconcile()
                except Exception:  # a bug here must not end the collector
                    log.exception("reconciling probe pods failed")
                    settled = False
                delay = self.resync_seconds if settled else self.retry_seconds
        finally:
            try:
                async with asyncio.timeout(self.stop_timeout_seconds):
                    await self.delete_all()
            except TimeoutError:
                log.warning(
                    "probe pods still being deleted after %.0f s", self.stop_timeout_seconds
                )
            finally:
                await self.client.aclose()

    async def reconcile(self) -> bool:
        """One pass: create what is missing, delete what is not needed. True if all went well."""
        async with self._lock:
            try:
                return await self._reconcile()
            finally:
                self.passes += 1

    async def _reconcile(self) -> bool:
        desired = dict(self._desired or {})
        wanted: dict[str, ProbePodRequest] = {}
        for key, request in desired.items():
            refusal = probe_pod_refusal(request, self.namespaces)
            if refusal is None:
                wanted[key] = request
            else:
                self._problem(key, f"no probe pod: {refusal}; its flows stay INCONCLUSIVE")
        for key in list(self._problems):
            if key not in desired:
                del self._problems[key]
        try:
            present = await self._ours()
        except KubeApiError as exc:
            if self._list_failure != exc.reason:
                log.warning("cannot list probe pods (will retry): %s", exc)
                self._list_failure = exc.reason
            return False
        self._list_failure = None
        settled = True
        for key, request in sorted(wanted.items()):
            pod = present.get(key)
            if pod is not None:
                if not pod.terminating:
                    self._resolved(key)
                continue  # a terminating one is made again once it is gone
            settled = await self._create(request) and settled
        for key, pod in sorted(present.items()):
            if key not in wanted and not pod.terminating:
                settled = await self._delete(pod) and settled
        return settled

    async def delete_all(self) -> None:
        """Delete every probe pod in the allowed namespaces (on shutdown)."""
        async with self._lock:
            await self._delete_all()

    async def _delete_all(self) -> None:
        try:
            present = await self._ours()
        except KubeApiError as exc:
            log.warning("cannot list probe pods to delete them: %s", exc)
            present = {}
        targets = {key: pod.uid for key, pod in present.items()}
        for key, uid in self._known.items():
            targets.setdefault(key, uid)
        for key, uid in sorted(targets.items()):
            namespace, _, name = key.partition("/")
            await self._delete(PodSummary(namespace, name, uid, {}, terminating=False))
        if targets:
            log.info("deleted %d probe pods", len(targets))

    # -- internals ---------------------------------------------------------------------------------

    async def _ours(self) -> dict[str, PodSummary]:
        pods = await self.client.list_pods(PROBE_POD_SELECTOR)
        ours = {
            p.key: p
            for p in pods
            if p.namespace in self.namespaces and p.name.startswith(PROBE_POD_PREFIX)
        }
        self._known = {key: pod.uid for key, pod in ours.items()}
        return ours

    async def _create(self, request: ProbePodRequest) -> bool:
        try:
            owners = await self._owners(request)
            if not owners:
                self._problem(
                    request.key, f"no probe pod: namespace {request.namespace!r} does not exist"
                )
                return False
            body = probe_pod_manifest(request, image=self.image, owners=owners)
            outcome = await self.client.create_pod(request.namespace, body)
        except KubeApiError as exc:
            self._problem(request.key, f"cannot create the probe pod: {exc.reason}")
            return False
        self._resolved(request.key)
        self._known.setdefault(request.key, "")
        if outcome == "created":
            owner = owners[0]
            log.info(
                "probe pod %s created (labels %s; owner %s %s)",
                request.key,
                ",".join(f"{k}={v}" for k, v in request.labels),
                owner.kind,
                owner.name,
            )
        return True

    async def _delete(self, pod: PodSummary) -> bool:
        try:
            outcome = await self.client.delete_pod(pod.namespace, pod.name, uid=pod.uid or None)
        except KubeApiError as exc:
            if exc.status == 409:  # another pod of that name now: not the one we meant
                return True
            self._problem(pod.key, f"cannot delete the probe pod: {exc.reason}")
            return False
        self._known.pop(pod.key, None)
        self._resolved(pod.key)
        if outcome == "deleted":
            log.info("probe pod %s deleted", pod.key)
        return True

    async def _owners(self, request: ProbePodRequest) -> list[OwnerReference]:
        owners: list[OwnerReference] = []
        for key in self.needed_by(request) if self.needed_by is not None else ():
            namespace, _, name = key.partition("/")
            if namespace != request.namespace:
                continue  # a namespaced owner elsewhere would make the garbage collector delete it
            uid = await self.client.uid_of("FlowExpectations", namespace, name)
            if uid is not None:  # None: the document came from a ConfigMap or a file
                owners.append(
                    OwnerReference(
                        f"{FLOWEXPECTATIONS_GROUP}/{FLOWEXPECTATIONS_VERSION}",
                        "FlowExpectations",
                        name,
                        uid,
                    )
                )
        if not owners:
            uid = await self.client.uid_of("Namespace", "", request.namespace)
            if uid is not None:
                owners.append(OwnerReference("v1", "Namespace", request.namespace, uid))
        return owners

    def _problem(self, key: str, why: str) -> None:
        self._problems[key] = why
        if self._logged.get(key) != why:
            log.warning("probe pod %s: %s", key, why)
            self._logged[key] = why

    def _resolved(self, key: str) -> None:
        self._problems.pop(key, None)
        self._logged.pop(key, None)


def kubernetes_probe_pods(
    configuration: KubeConfiguration,
    settings: CollectorSettings,
    *,
    needed_by: ExpectationsNeeding | None = None,
) -> KubernetesProbePods:
    """The probe pod manager of `--probe-pods kubernetes`: pass it to Collector(probe_pods=...)
    and run `.run(stop)` as a root task."""
    return KubernetesProbePods(
        KubeClient(configuration),
        namespaces=settings.probe_pod_namespaces,
        image=settings.probe_pod_image,
        needed_by=needed_by,
    )


# --- FlowExpectations status ----------------------------------------------------------------------


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str) -> str:
    return value if len(value) <= MAX_STATUS_TEXT else value[: MAX_STATUS_TEXT - 1] + "…"


def expectations_status(
    obj: ExpectationsObject, declared: Sequence[DeclaredStatus]
) -> dict[str, Any]:
    """The status of one FlowExpectations object from its declared flows (deploy/crds schema).

    `declared` are the object's entries of FlowState.declared(). `lastVerified` is the oldest
    last verification among the flows that have pod pairs, absent while any of them waits for
    its first probe; `failures` lists the failing and inconclusive flows, worst first, at most
    MAX_STATUS_FAILURES of them (`counts` has the totals).
    """
    counts: dict[Status, int] = {status: 0 for status in STATUS_ORDER}
    status: dict[str, Any] = {"observedGeneration": obj.generation, "flows": obj.flows}
    if obj.problem is not None:
        status.update(failing=0, counts=counts, failures=[], problem=_text(obj.problem))
        return status
    if not declared:
        counts["PENDING"] = obj.flows
    for flow in declared:
        counts[flow.status] += 1
    bad = sorted(
        (f for f in declared if f.status in FAILING or f.status == "INCONCLUSIVE"),
        key=lambda f: (status_rank(f.status), f.flow),
    )
    failures: list[dict[str, Any]] = []
    for flow in bad[:MAX_STATUS_FAILURES]:
        entry: dict[str, Any] = {"name": flow.flow, "status": flow.status}
        if flow.reason:
            entry["reason"] = _text(flow.reason)
        if flow.last_verified_at is not None:
            entry["lastVerified"] = rfc3339(flow.last_verified_at)
        failures.append(entry)
    verified = [f.last_verified_at for f in declared if f.counts]
    if verified and all(v is not None for v in verified):
        status["lastVerified"] = rfc3339(min(v for v in verified if v is not None))
    status.update(
        failing=sum(counts[s] for s in FAILING),
        counts=counts,
        failures=failures,
    )
    return status


# --- conditions and events -----------------------------------------------------------------------

VERIFIED: Final = "Verified"
"""True when every flow passes; False when one fails (or the object is invalid); Unknown while a
flow is pending, inconclusive or stale. `kubectl wait --for=condition=Verified fe/NAME`."""
READY: Final = "Ready"
"""True when the collector holds a current verdict for every flow of this generation; False while
a flow waits for its first probe or its verdict is stale, and when the object is invalid."""
MAX_NAMED_FLOWS: Final = 5
"""Flows a condition's message names (the rest are counted)."""


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": _text(message)}


def _named(failures: Sequence[Mapping[str, Any]], total: int) -> str:
    names = [f"{f['name']} ({f['status']})" for f in failures[:MAX_NAMED_FLOWS]]
    more = total - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def conditions_of(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Verified and Ready conditions (without times) that `status` (expectations_status's)
    implies; reasons are CamelCase words, as Kubernetes has them."""
    flows = int(status.get("flows", 0))
    if status.get("problem"):
        why = f"the collector rejected this object: {status['problem']}"
        return [
            _condition(VERIFIED, "False", "Invalid", why),
            _condition(READY, "False", "Invalid", why),
        ]
    counts: Mapping[str, int] = status.get("counts", {})
    failures: Sequence[Mapping[str, Any]] = status.get("failures", [])
    failing = int(status.get("failing", 0))
    if failing:
        bad = [f for f in failures if f["status"] in FAILING]
        verified = _condition(
            VERIFIED,
            "False",
            "FlowsFailing",
            f"{failing} of {flows} flows fail: {_named(bad, failing)}",
        )
    elif counts.get("PENDING"):
        verified = _condition(
            VERIFIED, "Unknown", "Pending", f"{counts['PENDING']} of {flows} flows wait for a probe"
        )
    elif counts.get("INCONCLUSIVE"):
        inconclusive = [f for f in failures if f["status"] == "INCONCLUSIVE"]
        verified = _condition(
            VERIFIED,
            "Unknown",
            "Inconclusive",
            f"{counts['INCONCLUSIVE']} of {flows} flows could not be decided: "
            + _named(inconclusive, counts["INCONCLUSIVE"]),
        )
    elif counts.get("STALE"):
        verified = _condition(
            VERIFIED, "Unknown", "Stale", f"{counts['STALE']} of {flows} flows have no fresh result"
        )
    else:
        verified = _condition(VERIFIED, "True", "AllFlowsPass", f"all {flows} flows pass")
    if counts.get("PENDING"):
        ready = _condition(
            READY, "False", "Pending", f"{counts['PENDING']} of {flows} flows wait for a probe"
        )
    elif counts.get("STALE"):
        ready = _condition(
            READY, "False", "Stale", f"{counts['STALE']} of {flows} flows have no fresh result"
        )
    else:
        ready = _condition(READY, "True", "Decided", f"every one of {flows} flows has a verdict")
    return [verified, ready]


def with_conditions(
    status: Mapping[str, Any], previous: Sequence[Mapping[str, Any]], *, now: float
) -> dict[str, Any]:
    """`status` with its conditions (observedGeneration, and lastTransitionTime kept from
    `previous` while a condition's status stays the same)."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    conditions = []
    for condition in conditions_of(status):
        old = before.get(condition["type"])
        since = (
            old["lastTransitionTime"]
            if old is not None
            and old.get("status") == condition["status"]
            and old.get("lastTransitionTime")
            else rfc3339(now)
        )
        conditions.append(
            {
                **condition,
                "observedGeneration": status["observedGeneration"],
                "lastTransitionTime": since,
            }
        )
    return {**status, "conditions": conditions}


@dataclass(frozen=True)
class Transition:
    """A condition that changed its status: what an Event says."""

    type: str
    """Normal or Warning."""
    reason: str
    message: str


def transitions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[Transition]:
    """The Events `new` conditions call for, against `old` (a condition not there before counts
    as Unknown, and a first Pending says nothing): Warning when a condition turns False."""
    before = {c.get("type"): c.get("status", "Unknown") for c in old if isinstance(c, Mapping)}
    found = []
    for condition in new:
        was = before.get(condition["type"])
        if was is None and condition["reason"] == "Pending":
            continue  # a new object waiting for its first probes: nothing happened yet
        if (was or "Unknown") == condition["status"]:
            continue
        kind = "Warning" if condition["status"] == "False" else "Normal"
        text = f"{condition['type']} is {condition['status']}: {condition['message']}"
        found.append(Transition(kind, condition["reason"], text))
    return found


def status_patch(status: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of `/status` that leaves exactly `status`: fields it lacks are removed."""
    removed = (set(STATUS_FIELDS) | set(current)) - set(status)
    return {**status, **dict.fromkeys(sorted(removed))}


async def status_publisher(
    collector: Collector,
    source: KubernetesSource,
    stop: asyncio.Event,
    *,
    debounce_seconds: float = 1.0,
    conflict_retry_seconds: float = 1.0,
) -> None:
    """Write every FlowExpectations' status until `stop` (a root task of the kubernetes source).

    Every `status_interval_seconds`, and `debounce_seconds` after a status or snapshot change
    (changes meanwhile are written together), each object whose status differs from what it
    has (or from what was last written) gets one merge patch, made against the resourceVersion
    the source last read. A conflict (the object changed meanwhile) is tried again
    `conflict_retry_seconds` later, by when the watch has brought the new version; another API
    error is logged by the source and tried on the next pass; nothing here ends the loop.
    """
    interval = collector.settings.status_interval_seconds
    if interval <= 0:
        log.info("status_interval_seconds is 0: no FlowExpectations status is written")
        await stop.wait()
        return
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def listener(event: LoopEvent) -> None:
        if isinstance(event, StatusChanged | SnapshotApplied):
            changed.set()

    collector.subscribe(listener)
    written: dict[tuple[str, str, str], dict[str, Any]] = {}
    due = loop.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, due - loop.time())):
                await first_of(changed, stop)
        if stop.is_set():
            return
        if changed.is_set() and loop.time() < due:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(debounce_seconds):
                    await stop.wait()
            if stop.is_set():
                return
        changed.clear()
        due = loop.time() + interval
        try:
            outcome = await publish_statuses(collector, source, written)
        except Exception:  # a bug here must not end the collector
            log.exception("writing FlowExpectations status failed")
            continue
        if outcome.conflicts:
            due = min(due, loop.time() + conflict_retry_seconds)


@dataclass(frozen=True)
class StatusPass:
    """What one pass of the status publisher did."""

    patched: int = 0
    conflicts: int = 0
    """Objects that changed between the source's read and the write (409): written later."""
    gone: int = 0
    """Objects deleted between the source's read and the write (404)."""


async def publish_statuses(
    collector: Collector,
    source: KubernetesSource,
    written: dict[tuple[str, str, str], dict[str, Any]],
) -> StatusPass:
    """One pass of status_publisher; `written` remembers what each object was given (by
    namespace, name and uid). Each patch is made against the resourceVersion the source read,
    so a status never lands on a version of the object (or a namesake) it was not made for."""
    if collector.snapshot is None:
        return StatusPass()
    by_document: dict[str, list[DeclaredStatus]] = defaultdict(list)
    for flow in collector.state.declared():
        by_document[flow.expectation].append(flow)
    objects = source.expectation_objects()
    now = collector.clock.time()
    patched = conflicts = gone = 0
    for obj in sorted(objects.values(), key=lambda o: o.key):
        identity = (obj.namespace, obj.name, obj.uid)
        found = written.get(identity, obj.status).get("conditions")
        previous: list[Mapping[str, Any]] = found if isinstance(found, list) else []
        status = with_conditions(
            expectations_status(obj, by_document.get(obj.key, [])), previous, now=now
        )
        if written.get(identity) == status:
            continue
        if identity not in written and dict(obj.status) == status:
            written[identity] = status  # it has this already (a restart)
            continue
        body = status_patch(status, {**obj.status, **written.get(identity, {})})
        result = await source.update_expectations_status(
            obj.namespace, obj.name, body, resource_version=obj.resource_version or None
        )
        if result == "written":
            written[identity] = status
            patched += 1
            for change in transitions(previous, status["conditions"]):
                await source.record_event(obj, change.type, change.reason, change.message)
        elif result == "conflict":
            conflicts += 1
        elif result == "gone":
            written.pop(identity, None)
            gone += 1
    for identity in list(written):
        held = objects.get(f"{identity[0]}/{identity[1]}")
        if held is None or held.uid != identity[2]:
            del written[identity]
    return StatusPass(patched, conflicts, gone)


def kube_source_settings(settings: CollectorSettings) -> KubeSourceSettings:
    """The Kubernetes source's settings for these collector settings."""
    return KubeSourceSettings(expectations_configmaps=settings.expectations_configmaps)


# --- PolicyReports (wgpolicyk8s.io/v1alpha2) --------------------------------------------------------

POLICY_REPORT_NAME: Final = "flowproof-networkpolicies"
"""The one PolicyReport the collector writes per namespace that holds NetworkPolicies."""
POLICY_REPORT_SELECTOR: Final = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
_RESULTS: Final = {
    "PROVEN": "pass",
    "NOT_ENFORCED": "fail",
    "UNPROVABLE": "skip",
    "PENDING": "skip",
}


def policy_report(namespace: str, items: Sequence[PolicyEvidence], now: float) -> dict[str, Any]:
    """The PolicyReport of a namespace: one result per NetworkPolicy (pass: proven; fail: not
    enforced; skip: unprovable or pending, with the reason), for Policy Reporter and Kyverno UIs."""
    seconds = int(now)
    results = []
    for item in sorted(items, key=lambda e: e.name):
        witnesses = sum(1 for _ in item.witnesses) + sum(len(r.witnesses) for r in item.rules)
        result = _RESULTS[item.status]
        results.append(
            {
                "source": "flowproof",
                "policy": item.name,
                "category": "NetworkPolicy evidence",
                "result": result,
                "severity": "high" if result == "fail" else "info",
                "message": _truncate(f"{item.status}: {item.reason}", MAX_STATUS_TEXT),
                "scored": result != "skip",
                "timestamp": {"seconds": seconds, "nanos": 0},
                "resources": [
                    {
                        "apiVersion": "networking.k8s.io/v1",
                        "kind": "NetworkPolicy",
                        "namespace": namespace,
                        "name": item.name,
                    }
                ],
                "properties": {"evidence": item.status, "witnesses": str(witnesses)},
            }
        )
    summary = {"pass": 0, "fail": 0, "warn": 0, "error": 0, "skip": 0}
    for r in results:
        summary[str(r["result"])] += 1
    return {
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "PolicyReport",
        "metadata": {
            "name": POLICY_REPORT_NAME,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/name": "flowproof"},
        },
        "summary": summary,
        "results": results,
    }


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _comparable(report: Mapping[str, Any]) -> Any:
    """A report without its timestamps: rewritten only when a result changed."""
    return [{k: v for k, v in r.items() if k != "timestamp"} for r in report.get("results", ())]


class PolicyReports:
    """One PolicyReport per namespace with NetworkPolicies, kept current (`--policy-reports`).

    `run(stop)` (a root task) writes a namespace's report when a result in it changed (soon after
    the collector's status changes, at most every `debounce_seconds`) and every `resync_seconds`
    anyway; it deletes its reports of namespaces that hold no NetworkPolicy any more. It touches
    only reports named flowproof-networkpolicies that carry its managed-by label. An API error is
    logged once per reason and tried again on the next pass; nothing here ends the collector.
    """

    def __init__(
        self,
        client: KubeClient,
        collector: Collector,
        *,
        resync_seconds: float = 60.0,
        debounce_seconds: float = 2.0,
    ) -> None:
        self.client = client
        self.collector = collector
        self.resync_seconds = resync_seconds
        self.debounce_seconds = debounce_seconds
        self._written: dict[str, Any] = {}  # namespace -> comparable content last written
        self._changed = asyncio.Event()
        self._logged: str | None = None
        self.passes = 0
        collector.subscribe(self._listen)

    def _listen(self, event: LoopEvent) -> None:
        if isinstance(event, StatusChanged | SnapshotApplied):
            self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_seconds):
                        await first_of(self._changed, stop)
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.debounce_seconds):
                        await stop.wait()
                self._changed.clear()
                try:
                    await self.publish()
                except Exception:  # a bug here must not end the collector
                    log.exception("writing PolicyReports failed")
        finally:
            await self.client.aclose()

    async def publish(self) -> int:
        """One pass: write what changed, delete what went; how many reports were written."""
        collector = self.collector
        if collector.snapshot is None:
            return 0
        by_namespace: dict[str, list[PolicyEvidence]] = defaultdict(list)
        for item in collector.state.evidence():
            by_namespace[item.namespace].append(item)
        now = collector.clock.time()
        written = 0
        try:
            for namespace in sorted(by_namespace):
                report = policy_report(namespace, by_namespace[namespace], now)
                content = _comparable(report)
                if self._written.get(namespace) == content:
                    continue
                outcome = await self.client.put_policy_report(namespace, report)
                self._written[namespace] = content
                written += 1
                log.info("PolicyReport %s/%s %s", namespace, POLICY_REPORT_NAME, outcome)
            present = await self.client.list_policy_reports(POLICY_REPORT_SELECTOR)
            for key, uid in sorted(present.items()):
                namespace, _, name = key.partition("/")
                if name == POLICY_REPORT_NAME and namespace not in by_namespace:
                    await self.client.delete_policy_report(namespace, name, uid=uid)
                    self._written.pop(namespace, None)
                    log.info("PolicyReport %s deleted: no NetworkPolicy left there", key)
        except KubeApiError as exc:
            if self._logged != exc.reason:
                hint = (
                    " (is the PolicyReport CRD installed? Policy Reporter or Kyverno installs it)"
                    if exc.status == 404
                    else ""
                )
                log.warning("cannot write PolicyReports (will retry): %s%s", exc, hint)
                self._logged = exc.reason
        else:
            self._logged = None
        finally:
            self.passes += 1
        return written
