"""KubernetesSource: the cluster, listed and watched, as immutable snapshots and exact changes.

Owns client configuration (kubeconfig or in-cluster), list+watch of pods, namespaces, NetworkPolicies,
FlowExpectations and (opt-in) labelled ConfigMaps of expectations (resourceVersions, bookmarks, 410
-> relist, backoff, resync), API discovery of the Network Policy API's cluster policy kinds (watched
with their semantics) and of other network plugins' policy kinds (watched for their presence
only: metadata), the store, the FlowExpectations status patch, KubeClient (probe pods: create,
list, delete) and ApiObjects (any object by its path, for the lab's mirror above the collector).
The only module that imports `kubernetes`: the blocking client runs in worker threads, never on
the event loop, and API objects become model objects here, once. A malformed object is logged
once and left out; nothing in an object can stop the loop.

The watch reads the API's stream itself (`_watch_blocking`) rather than through the client's
`watch.Watch`: that one deserialises every event into the client's models, which the source never
reads (2.8x the CPU per pod event, bench/watch_bench.py), and its `deserialize=False` mode tracks
no resourceVersion, ignores bookmarks and fails on an ERROR event (KeyError 'raw_object').
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, cast

import urllib3
import yaml
from kubernetes.client import (
    ApiClient,
    ApisApi,
    Configuration,
    CoordinationV1Api,
    CoreV1Api,
    CustomObjectsApi,
    EventsV1Api,
    NetworkingV1Api,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from collector.core.changes import ChangeEvent
from collector.core.model import (
    ClusterNetworkPolicy,
    Expectations,
    Namespace,
    NetworkPolicy,
    Pod,
    Snapshot,
    UnmodelledPolicy,
)
from collector.reading.clusterpolicies import (
    CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_KINDS,
    cluster_policy_from_dict,
)
from collector.reading.expectations import expectations_from_configmap, expectations_from_dict
from collector.reading.fields import Where
from collector.reading.objects import (
    is_plugin_policy_kind,
    namespace_from_dict,
    plugin_of,
    pod_from_dict,
    policy_from_dict,
)
from flowproof.aio import Backoff
from flowproof.errors import ConfigurationError, FlowproofError, InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
ObjectKind = Literal[
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "FlowExpectations",
    "ConfigMap",
    "ClusterNetworkPolicy",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
    "UnmodelledPolicy",
]
Action = Literal["added", "modified", "deleted"]
KubeConfiguration = Configuration
"""The client configuration `load_kube_config` returns (for annotations outside this module)."""

SERVICE_TOKEN_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CA_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
SERVICE_ACCOUNT_NAMESPACE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
FLOWEXPECTATIONS_GROUP: Final = "flowproof.dev"
FLOWEXPECTATIONS_VERSION: Final = "v1alpha1"
FLOWEXPECTATIONS_PLURAL: Final = "flowexpectations"
POLICY_REPORT_GROUP: Final = "wgpolicyk8s.io"
POLICY_REPORT_VERSION: Final = "v1alpha2"
POLICY_REPORT_PLURAL: Final = "policyreports"
TERMINATING_PHASE: Final = "Terminating"
"""`Pod.phase` of a pod whose deletion has begun (metadata.deletionTimestamp is set)."""
EXPECTATIONS_CONFIGMAP_LABEL: Final = "flowproof.dev/expectations"
"""A ConfigMap labelled with this (value "true") holds FlowExpectations documents in its data."""
EXPECTATIONS_CONFIGMAP_SELECTOR: Final = f"{EXPECTATIONS_CONFIGMAP_LABEL}=true"
EVENT_CONTROLLER: Final = "flowproof.dev/collector"
"""The reportingController of the Events the collector records (events.k8s.io/v1)."""

PARTIAL_METADATA_ACCEPT: Final = (
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
)
"""Lists of other plugins' policy kinds ask for metadata only (their presence)."""
PARTIAL_METADATA_WATCH_ACCEPT: Final = (
    "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
)
"""Their watches too: a watch event holds one object, so the type is PartialObjectMetadata (a
real API server ends a watch asking for a List type at once)."""
MAX_DISCOVERED_RESOURCES: Final = 32
"""Discovered resources watched at most (each watch holds a worker thread)."""

_GONE: Final = 410
_SHORT_WATCH_SECONDS: Final = 1.0  # a watch that ends sooner with no event is a failure (client-go)


# --- configuration --------------------------------------------------------------------------------


def load_kube_config(
    kubeconfig: str | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    token_path: str = SERVICE_TOKEN_PATH,
    ca_path: str = SERVICE_CA_PATH,
) -> Configuration:
    """The client configuration, found the way controller-runtime finds it.

    `kubeconfig` if given, else `$KUBECONFIG`, else in-cluster (service account token and CA at
    `token_path`/`ca_path`, API server from `$KUBERNETES_SERVICE_HOST`/`_PORT`), else
    `~/.kube/config`. The token is re-read every minute, as projected tokens rotate. Nothing global
    is changed. Raises ConfigurationError naming what is missing.
    """
    env = os.environ if environ is None else environ
    configuration = Configuration()
    path = kubeconfig or env.get("KUBECONFIG") or None
    try:
        if path is None and env.get("KUBERNETES_SERVICE_HOST"):
            loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=token_path, cert_filename=ca_path, environ=env
            )
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
            log.info("Kubernetes API %s with the in-cluster service account", configuration.host)
            return configuration
        path = path or os.path.expanduser("~/.kube/config")
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        where = "in-cluster service account" if path is None else f"kubeconfig {path}"
        raise ConfigurationError(
            f"cannot configure the Kubernetes client from the {where}: {exc}"
        ) from exc
    log.info("Kubernetes API %s from kubeconfig %s", configuration.host, path)
    return configuration


# --- settings, updates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeSourceSettings:
    """How the Kubernetes source lists and watches (defaults suit a real cluster)."""

    watch_timeout_seconds: float = 300.0
    """Server-side `timeoutSeconds` of one watch; each watch adds up to 100 % jitter (client-go:
    5-10 minutes) and never outlives the next resync. Whole seconds (truncated), at least 1."""
    resync_interval_seconds: float = 600.0
    """Relist everything this often, repairing anything a watch missed; 0 turns resync off."""
    backoff_initial_seconds: float = 0.5
    """First wait before reconnecting after a failed list or watch; doubles on each failure."""
    backoff_max_seconds: float = 30.0
    """The longest wait between reconnects."""
    backoff_jitter: float = 0.5
    """Up to this fraction of each wait is taken off at random, so that reconnects spread out."""
    request_timeout_seconds: float = 60.0
    """Connect and read timeout of lists and patches; a watch's read timeout is its
    timeoutSeconds plus this."""
    list_page_size: int = 500
    """Objects per list page (`limit`); the continue token fetches the rest."""
    missing_crd_retry_seconds: float = 60.0
    """When the API does not serve FlowExpectations (CRD not installed), or refuses to list them
    or the expectations ConfigMaps (RBAC), look again this often; meanwhile the snapshot has no
    expectations from there (the rest syncs without waiting). Also how often a discovered policy
    kind that may not be listed (RBAC) is tried again."""
    discovery_interval_seconds: float = 60.0
    """How often API discovery looks for the Network Policy API's kinds and other network
    plugins' policy kinds (a CRD installed or removed later is seen within this)."""
    stop_timeout_seconds: float = 5.0
    """How long stopping waits for worker threads to leave their requests."""
    expectations_configmaps: bool = False
    """Also list and watch ConfigMaps labelled `flowproof.dev/expectations=true` (every
    namespace) and read each data value as FlowExpectations documents, for teams that cannot
    install the CRD. Needs list and watch on ConfigMaps."""

    def __post_init__(self) -> None:
        positive = (
            "watch_timeout_seconds",
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "request_timeout_seconds",
            "missing_crd_retry_seconds",
            "discovery_interval_seconds",
            "stop_timeout_seconds",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be greater than 0")
        if self.resync_interval_seconds < 0:
            raise ConfigurationError("resync_interval_seconds must be 0 (off) or more")
        if not 0 <= self.backoff_jitter < 1:
            raise ConfigurationError("backoff_jitter must be at least 0 and less than 1")
        if self.list_page_size < 1:
            raise ConfigurationError("list_page_size must be at least 1")


@dataclass(frozen=True)
class ObjectChange:
    """One object that changed between two published snapshots."""

    kind: ObjectKind
    namespace: str  # "" for namespaces
    name: str
    action: Action
    fields: frozenset[str] = frozenset()
    """For `modified`: the model fields that changed, e.g. {"labels", "ips", "phase"} of a Pod,
    {"labels"} of a Namespace, {"ingress"} of a NetworkPolicy, {"flows"} of Expectations."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def labels_changed(self) -> bool:
        return "labels" in self.fields

    @property
    def ips_changed(self) -> bool:
        return "ips" in self.fields

    @property
    def phase_changed(self) -> bool:
        return "phase" in self.fields


@dataclass(frozen=True)
class InventoryUpdate:
    """A new snapshot and exactly what changed since the previous one.

    The first update after start has `initial` set and no changes: everything is new. Later updates
    carry the net changes of the events applied together (an object added and deleted between two
    snapshots does not appear); an update is published only when something changed.
    """

    snapshot: Snapshot
    changes: tuple[ObjectChange, ...] = ()
    initial: bool = False

    def pods_change(self, *, generation: int, at: float) -> ChangeEvent | None:
        """What changed, made from the update's own changes when they are all pods (the churn
        of a cluster), as `diff_snapshots` of the two snapshots would say it; None for the first
        update or one that changed anything else (then diff the snapshots). A diff compares
        every pod: 30 ms at 10,000 pods, of the GIL the event loop needs."""
        if self.initial or not self.changes or any(c.kind != "Pod" for c in self.changes):
            return None
        keys: dict[Action, set[str]] = {"added": set(), "deleted": set(), "modified": set()}
        for change in self.changes:
            keys[change.action].add(change.key)
        return ChangeEvent(
            generation=generation,
            at=at,
            observed_at=at,
            pods_added=frozenset(keys["added"]),
            pods_removed=frozenset(keys["deleted"]),
            pods_changed=frozenset(keys["modified"]),
        )


OnUpdate = Callable[[InventoryUpdate], Awaitable[None]]


@dataclass(frozen=True)
class ConfigMapExpectations:
    """The FlowExpectations documents of one labelled ConfigMap that could be read, in the
    order of its data keys."""

    expectations: tuple[Expectations, ...]


@dataclass(frozen=True)
class ExpectationsObject:
    """A FlowExpectations custom resource as the API holds it: what its status is written for."""

    namespace: str
    name: str
    uid: str
    generation: int
    flows: int
    """How many entries spec.flows has (also when the object could not be read)."""
    problem: str | None
    """Why the object is left out of the snapshot; None when it is in."""
    status: Mapping[str, Any]
    """Its status as last read from the API."""
    resource_version: str = ""
    """The resourceVersion it was last read at: a status write is made against exactly this
    version (optimistic concurrency), so it never lands on a newer or re-created object."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


StatusWrite = Literal["written", "conflict", "gone", "failed"]
"""How a status write ended: written; refused with 409 because the object changed since it was
read (write again once the watch brings the new version); the object is gone (404); or any
other failure (logged once per object and reason)."""


_Model = (
    Namespace
    | Pod
    | NetworkPolicy
    | ClusterNetworkPolicy
    | UnmodelledPolicy
    | Expectations
    | ConfigMapExpectations
)


# --- conversion (the one place API objects become model objects) ----------------------------------


@dataclass(frozen=True)
class _Resource:
    """One resource the source lists and watches: fixed, or found by API discovery.

    `kind` is the model kind it becomes; `api_kind` the API's kind (another plugin's kind for
    UnmodelledPolicy). `key` names its store and its resourceVersion: the plural for the fixed
    resources, `plural.group` for discovered ones.
    """

    kind: ObjectKind
    plural: str
    namespaced: bool
    group: str = ""
    version: str = "v1"
    api_kind: str = ""
    discovered: bool = False

    @property
    def key(self) -> str:
        return f"{self.plural}.{self.group}" if self.discovered else self.plural

    @property
    def label(self) -> str:
        """How messages name its objects: `Pod`, `CiliumNetworkPolicy`."""
        return self.api_kind or self.kind


_RESOURCES: Final[tuple[_Resource, ...]] = (
    _Resource("Namespace", "namespaces", namespaced=False),
    _Resource("Pod", "pods", namespaced=True),
    _Resource("NetworkPolicy", "networkpolicies", namespaced=True),
    _Resource("FlowExpectations", FLOWEXPECTATIONS_PLURAL, namespaced=True),
    _Resource("ConfigMap", "configmaps", namespaced=True),
)
_OPTIONAL: Final = frozenset({"FlowExpectations", "ConfigMap"})
"""Resources whose absence (no CRD, no RBAC) leaves the snapshot without them, never waiting."""
_KIND_ORDER: Final[Mapping[str, int]] = {
    **{r.kind: i for i, r in enumerate(_RESOURCES)},
    **{kind: len(_RESOURCES) + i for i, kind in enumerate(CLUSTER_POLICY_KINDS)},
    "UnmodelledPolicy": len(_RESOURCES) + len(CLUSTER_POLICY_KINDS),
}


@dataclass(frozen=True)
class _Converted:
    """An API object read into the model; `value` None with `problem` set if it could not be.

    A ConfigMap may have both: the documents that could be read, and why the others could not.
    """

    key: str
    value: _Model | None
    problem: str | None = None
    object: ExpectationsObject | None = None  # FlowExpectations only
    warnings: tuple[str, ...] = ()  # what was read but should be changed (a legacy CIDR form)


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _object_key(resource: _Resource, obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _metadata(obj)
    name = meta.get("name")
    namespace = meta.get("namespace") if resource.namespaced else ""
    return (
        namespace if isinstance(namespace, str) else "",
        name if isinstance(name, str) else "",
    )


def _key_text(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    rv = _metadata(obj).get("resourceVersion")
    return rv if isinstance(rv, str) and rv else None


def _convert(resource: _Resource, obj: Mapping[str, Any]) -> _Converted:
    """Read one API object (a dict as the API sends it) into the model; never raises."""
    namespace, name = _object_key(resource, obj)
    key = _key_text(namespace, name)
    if not name or (resource.namespaced and not namespace):
        return _Converted(key or "<unnamed>", None, "metadata.name/namespace missing")
    if resource.kind == "ConfigMap":
        return _configmap_expectations(namespace, name, obj)
    path = (
        f"namespaces/{namespace}/{resource.plural}/{name}"
        if namespace
        else f"{resource.plural}/{name}"
    )
    if resource.group and resource.discovered:
        path = f"{resource.group}/{path}"
    where = Where(file=f"api:{path}")
    warnings: list[str] = []
    try:
        value: _Model
        if resource.kind == "UnmodelledPolicy":
            # Presence only: the metadata is all that is read (the list asks for no more).
            value = UnmodelledPolicy(
                resource.group,
                resource.version,
                resource.api_kind,
                namespace,
                name,
                f"api:{path}",
            )
        elif resource.kind in CLUSTER_POLICY_KINDS:
            document = dict(obj)
            document.setdefault("apiVersion", f"{resource.group}/{resource.version}")
            document.setdefault("kind", resource.kind)
            value = cluster_policy_from_dict(document, where, warnings=warnings)
        elif resource.kind == "Pod":
            pod = pod_from_dict(obj, where)
            if _metadata(obj).get("deletionTimestamp"):
                pod = dataclasses.replace(pod, phase=TERMINATING_PHASE)
            value = pod
        elif resource.kind == "Namespace":
            value = namespace_from_dict(obj, where)
        elif resource.kind == "NetworkPolicy":
            # Served objects were accepted by an API server once, maybe under older rules.
            value = policy_from_dict(obj, where, served=True, warnings=warnings)
        else:
            # The status is ours (written by the collector), not intent; a list item may lack
            # the type fields the format requires.
            document = {k: v for k, v in obj.items() if k != "status"}
            document.setdefault(
                "apiVersion", f"{FLOWEXPECTATIONS_GROUP}/{FLOWEXPECTATIONS_VERSION}"
            )
            document.setdefault("kind", "FlowExpectations")
            value = expectations_from_dict(document, where)
    except InputError as exc:
        return _with_object(resource, obj, _Converted(key, None, str(exc)))
    except Exception as exc:  # a converter bug on odd input must not stop the inventory
        log.exception("reading %s %s failed", resource.label, key)
        return _with_object(resource, obj, _Converted(key, None, f"could not be read: {exc!r}"))
    return _with_object(resource, obj, _Converted(key, value, warnings=tuple(warnings)))


def _with_object(resource: _Resource, obj: Mapping[str, Any], item: _Converted) -> _Converted:
    """`item` with the ExpectationsObject of a FlowExpectations custom resource."""
    if resource.kind != "FlowExpectations":
        return item
    namespace, name = _object_key(resource, obj)
    meta = _metadata(obj)
    spec = obj.get("spec")
    flows = spec.get("flows") if isinstance(spec, Mapping) else None
    status = obj.get("status")
    generation = meta.get("generation")
    found = ExpectationsObject(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        generation=generation if isinstance(generation, int) else 0,
        flows=len(flows) if isinstance(flows, list) else 0,
        problem=item.problem,
        status=status if isinstance(status, Mapping) else {},
        resource_version=_resource_version(obj) or "",
    )
    return dataclasses.replace(item, object=found)


def _configmap_expectations(namespace: str, name: str, obj: Mapping[str, Any]) -> _Converted:
    """The FlowExpectations documents in a labelled ConfigMap (collector.reading.expectations)."""
    key = _key_text(namespace, name)
    documents, problems = expectations_from_configmap(namespace, name, obj.get("data"))
    problem = "\n".join(problems) or None
    if not documents and problem is not None:
        return _Converted(key, None, problem)
    return _Converted(key, ConfigMapExpectations(documents), problem)


def _changed_fields(old: _Model, new: _Model) -> frozenset[str]:
    return frozenset(
        f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)
    )


# --- the source -----------------------------------------------------------------------------------


class _Gone(Exception):
    """The resourceVersion is too old (410): list again."""


class _StreamError(Exception):
    """A watch stream said something that is not a usable event."""


_TRANSIENT: Final = (
    ApiException,
    urllib3.exceptions.HTTPError,
    OSError,
    _StreamError,
    ConfigException,
)


@dataclass(frozen=True)
class _Replace:
    """The complete list of one resource."""

    resource: _Resource
    items: Sequence[_Converted]


@dataclass(frozen=True)
class _Event:
    """One watch event of one resource."""

    resource: _Resource
    deleted: bool
    item: _Converted


@dataclass(frozen=True)
class _Discovered:
    """API discovery ran (the applier may now publish the first snapshot)."""


@dataclass
class _ResourceState:
    """Per resource: the resourceVersion to watch from (None: list first), and counters.

    `resource_version` is written by the worker thread as it reads the stream and read by the
    event loop only when that thread is done (or for display)."""

    resource: _Resource
    resource_version: str | None = None
    lists: int = 0
    watches: int = 0
    unavailable: bool = False  # an optional resource the API does not serve or lets us read


@dataclass
class _Stopping:
    event: threading.Event = field(default_factory=threading.Event)
    responses: set[urllib3.BaseHTTPResponse] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class KubernetesSource:
    """Lists and watches the cluster and publishes snapshots (see InventoryUpdate).

    Use: `async with KubernetesSource(load_kube_config(path), on_update=...) as source:` then run
    `await source.run()` as a root task (it returns only by cancellation, or raises on a bug).
    `on_update` is awaited for each new snapshot; events arriving meanwhile are applied together
    into the next one, so a slow consumer sees fewer, larger updates and never a backlog.
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        settings: KubeSourceSettings | None = None,
        on_update: OnUpdate | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or KubeSourceSettings()
        self._on_update = on_update
        self._rng = rng or random.Random()
        self._api = ApiClient(configuration)
        self._core = CoreV1Api(self._api)
        self._networking = NetworkingV1Api(self._api)
        self._custom = CustomObjectsApi(self._api)
        self._events = EventsV1Api(self._api)
        self._event_failure: str | None = None
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()
        self._resources = tuple(
            r for r in _RESOURCES if r.kind != "ConfigMap" or self.settings.expectations_configmaps
        )
        self._apis = ApisApi(self._api)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self._resources) + 4 + MAX_DISCOVERED_RESOURCES,
            thread_name_prefix="kube-inventory",
        )
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._in_flight_lock = threading.Lock()
        self._stopping = _Stopping()
        self._states: dict[str, _ResourceState] = {
            r.key: _ResourceState(r) for r in self._resources
        }
        self._reflectors: dict[str, asyncio.Task[None]] = {}  # discovered resources' reflectors
        self._discovered_once = False
        self._inbox: asyncio.Queue[_Replace | _Event | _Discovered] = asyncio.Queue()
        self._store: dict[str, dict[str, _Model]] = {r.key: {} for r in _RESOURCES}
        # Per store, its keys in order, kept while no key is added or removed (a pod's label
        # change then costs the snapshot a pass over the pods, not a sort of them).
        self._sorted_keys: dict[str, list[str]] = {}
        self._labels: dict[str, _Resource] = {r.key: r for r in _RESOURCES}
        self._objects: dict[str, ExpectationsObject] = {}
        self._listed: set[str] = set()
        self._problems: dict[tuple[str, str], str] = {}  # (resource label, object key) -> why
        self._warned: dict[tuple[str, str], tuple[str, ...]] = {}
        self._shadowed: dict[str, str] = {}  # ConfigMap key -> why some of its documents are not in
        self._status_failures: dict[str, str] = {}  # FlowExpectations key -> why its patch failed
        self._snapshot = Snapshot()
        self._synced = asyncio.Event()
        self._running = False

    # --- public ---------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The latest published snapshot (empty before the first)."""
        return self._snapshot

    @property
    def resource_versions(self) -> Mapping[str, str | None]:
        """Per resource (plural), the resourceVersion a watch resumes from; None: list next."""
        return {s.resource.plural: s.resource_version for s in self._states.values()}

    @property
    def problems(self) -> Mapping[str, str]:
        """Objects (or, for ConfigMaps, documents) left out because they could not be read or
        are declared twice: `"Kind ns/name"` -> why."""
        found = {f"{label} {key}": why for (label, key), why in sorted(self._problems.items())}
        for key, why in sorted(self._shadowed.items()):
            name = f"ConfigMap {key}"
            found[name] = f"{found[name]}\n{why}" if name in found else why
        return found

    def expectation_objects(self) -> Mapping[str, ExpectationsObject]:
        """Every FlowExpectations custom resource the source knows ("ns/name" -> object), also
        those left out of the snapshot (with their problem). Its uid and generation are those of
        the latest snapshot once it is published: both change together, between two awaits."""
        return dict(self._objects)

    async def wait_synced(self) -> Snapshot:
        """The first complete snapshot, once every resource has been listed."""
        await self._synced.wait()
        return self._snapshot

    async def run(self) -> None:
        """List and watch every resource until cancelled."""
        if self._running:
            raise RuntimeError("KubernetesSource.run() is already running")
        self._running = True
        self._stopping.event.clear()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._applier(), name="kube-inventory-applier")
                tasks.create_task(self._discoverer(tasks), name="kube-discovery")
                for state in list(self._states.values()):
                    tasks.create_task(
                        self._reflector(state), name=f"kube-reflector-{state.resource.plural}"
                    )
        finally:
            self._running = False
            self._reflectors.clear()
            await self._stop_threads()

    async def update_expectations_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> StatusWrite:
        """Merge-patch the `/status` subresource of a FlowExpectations object.

        With `resource_version` the patch carries it as a precondition: the API server refuses
        it with 409 Conflict when the object changed (or was deleted and made again) since that
        version was read. Never raises for the API's answer; a failure other than a conflict or
        a vanished object is logged once per object and reason.
        """
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}

        def patch() -> None:
            response = self._custom.patch_namespaced_custom_object_status(
                FLOWEXPECTATIONS_GROUP,
                FLOWEXPECTATIONS_VERSION,
                namespace,
                FLOWEXPECTATIONS_PLURAL,
                name,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=self._request_timeout(),
            )
            answer = cast(urllib3.BaseHTTPResponse, response)
            try:
                _read_json(answer)
            finally:
                answer.release_conn()

        key = _key_text(namespace, name)
        try:
            await self._in_thread(patch)
        except ApiException as exc:
            if exc.status in (404, 409):
                log.info(
                    "FlowExpectations %s %s; its status is written again once the watch "
                    "brings the current object",
                    key,
                    "is gone" if exc.status == 404 else "changed since it was read (409)",
                )
                return "gone" if exc.status == 404 else "conflict"
            self._status_failed(key, exc)
            return "failed"
        except _TRANSIENT as exc:
            self._status_failed(key, exc)
            return "failed"
        self._status_failures.pop(key, None)
        return "written"

    def _status_failed(self, key: str, exc: BaseException) -> None:
        why = _describe(exc)
        if self._status_failures.get(key) != why:  # once per distinct reason
            log.warning("cannot update the status of FlowExpectations %s: %s", key, why)
            self._status_failures[key] = why

    async def record_event(
        self, regarding: ExpectationsObject, kind: str, reason: str, note: str
    ) -> bool:
        """Create an Event (events.k8s.io/v1) about a FlowExpectations object: `kind` Normal or
        Warning, a CamelCase `reason` and a `note` (at most 1 kB). Returns False (and logs why,
        once per reason) when the API refused; it is not retried."""
        now = datetime.datetime.now(datetime.UTC)
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            # Named as client-go's recorder names Events: object name, ".", the time in hex
            # nanoseconds (a generateName ending in "." is refused by a real API server).
            "metadata": {
                "name": f"{regarding.name[:236]}.{time.time_ns():x}",
                "namespace": regarding.namespace,
            },
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "type": kind,
            "reason": reason,
            "action": "Verify",
            "note": note[:1024],
            "reportingController": EVENT_CONTROLLER,
            "reportingInstance": self._instance[:128],
            "regarding": {
                "apiVersion": f"{FLOWEXPECTATIONS_GROUP}/{FLOWEXPECTATIONS_VERSION}",
                "kind": "FlowExpectations",
                "namespace": regarding.namespace,
                "name": regarding.name,
                "uid": regarding.uid,
            },
        }

        def create() -> None:
            response = self._events.create_namespaced_event(
                regarding.namespace,
                cast(Any, body),  # a dict is sent as it is
                _preload_content=False,
                _request_timeout=self._request_timeout(),
            )
            answer = cast(urllib3.BaseHTTPResponse, response)
            try:
                _read_json(answer)
            finally:
                answer.release_conn()

        try:
            await self._in_thread(create)
        except _TRANSIENT as exc:
            why = _describe(exc)
            if self._event_failure != why:
                log.warning("cannot record an Event about %s: %s", regarding.key, why)
                self._event_failure = why
            return False
        self._event_failure = None
        return True

    async def aclose(self) -> None:
        """Stop the worker threads and close the client's connections."""
        await self._stop_threads()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> KubernetesSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- threads --------------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        future = self._pool.submit(fn, *args)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._forget)
        return await asyncio.wrap_future(future)

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    async def _stop_threads(self) -> None:
        """Interrupt every open response and wait (bounded) for the threads to return.

        The stop flag stays set until the next run(): a thread that gets its response only now
        shuts it down itself (see _tracked), so none is left blocked on a stream.
        """
        stopping = self._stopping
        with stopping.lock:
            stopping.event.set()
            responses = list(stopping.responses)
        for response in responses:
            _interrupt(response)
        with self._in_flight_lock:
            running = [f for f in self._in_flight if not f.done()]
        pending = [asyncio.wrap_future(f) for f in running]
        for future in pending:
            future.add_done_callback(_retrieve)  # a thread's failure is moot once stopping
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.stop_timeout_seconds)
            if late:
                log.warning("%d Kubernetes requests still running after stop", len(late))

    @contextlib.contextmanager
    def _tracked(self, response: urllib3.BaseHTTPResponse) -> Iterator[None]:
        stopping = self._stopping
        with stopping.lock:
            stopping.responses.add(response)
            if stopping.event.is_set():
                _interrupt(response)
        try:
            yield
        finally:
            with stopping.lock:
                stopping.responses.discard(response)
            response.close()
            response.release_conn()

    def _request_timeout(self, read: float | None = None) -> tuple[float, float]:
        timeout = self.settings.request_timeout_seconds
        return (timeout, read if read is not None else timeout)

    def _lister(self, resource: _Resource, *, watch: bool = False) -> Callable[..., object]:
        if resource.discovered:
            if resource.kind == "UnmodelledPolicy":
                accept = PARTIAL_METADATA_WATCH_ACCEPT if watch else PARTIAL_METADATA_ACCEPT
                return functools.partial(
                    self._custom.list_cluster_custom_object,
                    resource.group,
                    resource.version,
                    resource.plural,
                    _headers={"Accept": accept},
                )
            return functools.partial(
                self._custom.list_cluster_custom_object,
                resource.group,
                resource.version,
                resource.plural,
            )
        if resource.kind == "Pod":
            return self._core.list_pod_for_all_namespaces
        if resource.kind == "Namespace":
            return self._core.list_namespace
        if resource.kind == "NetworkPolicy":
            return self._networking.list_network_policy_for_all_namespaces
        if resource.kind == "ConfigMap":
            return functools.partial(
                self._core.list_config_map_for_all_namespaces,
                label_selector=EXPECTATIONS_CONFIGMAP_SELECTOR,
            )
        return functools.partial(
            self._custom.list_cluster_custom_object,
            FLOWEXPECTATIONS_GROUP,
            FLOWEXPECTATIONS_VERSION,
            FLOWEXPECTATIONS_PLURAL,
        )

    def _list_blocking(self, resource: _Resource) -> tuple[list[_Converted], str]:
        """(every object, the list's resourceVersion), page by page; in a worker thread."""
        call = self._lister(resource)
        items: list[_Converted] = []
        token: str | None = None
        while True:
            response = cast(
                urllib3.BaseHTTPResponse,
                call(
                    limit=self.settings.list_page_size,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=self._request_timeout(),
                ),
            )
            with self._tracked(response):
                body = _read_json(response)
            raw_items = body.get("items")
            for raw in raw_items if isinstance(raw_items, list) else ():
                if isinstance(raw, Mapping):
                    items.append(_convert(resource, raw))
            meta = _metadata(body)
            token = meta.get("continue") or None
            if token is None:
                return items, str(meta.get("resourceVersion") or "")

    def _watch_blocking(
        self,
        state: _ResourceState,
        timeout_seconds: int,
        emit: Callable[[_Event], None],
    ) -> int:
        """Watch from `state.resource_version` until the stream ends; returns the events read.

        Runs in a worker thread. Raises _Gone on 410, _StreamError on an ERROR event or garbage,
        and the client's exceptions for HTTP and connection failures.
        """
        resource = state.resource
        response = cast(
            urllib3.BaseHTTPResponse,
            self._lister(resource, watch=True)(
                watch=True,
                resource_version=state.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                _preload_content=False,
                _request_timeout=self._request_timeout(
                    timeout_seconds + self.settings.request_timeout_seconds
                ),
            ),
        )
        events = 0
        with self._tracked(response):
            for line in _lines(response):
                if self._stopping.event.is_set():
                    break
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise _StreamError(f"a watch line is not JSON: {line[:200]!r}") from exc
                kind = event.get("type") if isinstance(event, Mapping) else None
                obj = event.get("object") if isinstance(event, Mapping) else None
                if not isinstance(obj, Mapping):
                    raise _StreamError(f"a watch event without an object: {line[:200]!r}")
                if kind == "ERROR":
                    code, message = obj.get("code"), obj.get("message", "")
                    if code == _GONE:
                        raise _Gone(str(message))
                    raise _StreamError(f"ERROR event {code} {obj.get('reason', '')}: {message}")
                version = _resource_version(obj)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    if kind == "DELETED":
                        namespace, name = _object_key(resource, obj)
                        item = _Converted(_key_text(namespace, name), None)
                    else:
                        item = _convert(resource, obj)
                    emit(_Event(resource, kind == "DELETED", item))
                    events += 1
                elif kind != "BOOKMARK":
                    log.debug("ignoring a %s watch event of type %r", resource.plural, kind)
                    continue
                if version is not None:
                    state.resource_version = version
        return events

    # --- the loop side --------------------------------------------------------------------------

    def _watch_timeout(self, until_resync: float) -> int:
        seconds = self.settings.watch_timeout_seconds * (1.0 + self._rng.random())
        return max(1, int(min(seconds, until_resync)))

    async def _reflector(self, state: _ResourceState) -> None:
        """List, then watch from the list's resourceVersion, forever; relist on 410 and resync."""
        loop = asyncio.get_running_loop()
        resource = state.resource
        settings = self.settings
        backoff = Backoff(
            settings.backoff_initial_seconds,
            settings.backoff_max_seconds,
            settings.backoff_jitter,
            self._rng,
        )
        resync_at = math.inf

        def emit(event: _Event) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(self._inbox.put_nowait, event)

        while True:
            if state.resource_version is None or loop.time() >= resync_at:
                try:
                    items, version = await self._in_thread(self._list_blocking, resource)
                except ApiException as exc:
                    if exc.status in (403, 404) and resource.kind in _OPTIONAL:
                        await self._unavailable(state, exc)
                        continue
                    if exc.status in (403, 404) and resource.discovered:
                        await self._unlistable(state, exc)
                        continue
                    await self._pause(backoff, f"listing {resource.plural} failed", exc)
                    continue
                except _TRANSIENT as exc:
                    await self._pause(backoff, f"listing {resource.plural} failed", exc)
                    continue
                if state.unavailable:
                    log.info("%s can be listed now", resource.plural)
                    state.unavailable = False
                self._inbox.put_nowait(_Replace(resource, items))
                state.resource_version = version or None
                state.lists += 1
                backoff.reset()
                interval = settings.resync_interval_seconds
                resync_at = loop.time() + interval if interval > 0 else math.inf
                if state.resource_version is None:
                    continue  # nothing to watch from: this server gives no resourceVersion

            timeout = self._watch_timeout(resync_at - loop.time())
            started = loop.time()
            state.watches += 1
            try:
                events = await self._in_thread(self._watch_blocking, state, timeout, emit)
            except _Gone as exc:
                log.info("%s watch expired (%s); listing again", resource.plural, exc)
                state.resource_version = None
                continue
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("%s watch expired (410 Gone); listing again", resource.plural)
                    state.resource_version = None
                    continue
                await self._pause(backoff, f"watching {resource.plural} failed", exc)
                continue
            except _TRANSIENT as exc:
                await self._pause(backoff, f"watching {resource.plural} broke", exc)
                continue
            if events == 0 and loop.time() - started < min(_SHORT_WATCH_SECONDS, timeout):
                # Ended at once with nothing in it: do not hammer the API server.
                await self._pause(backoff, f"{resource.plural} watch ended at once", None)
            else:
                backoff.reset()

    async def _pause(self, backoff: Backoff, what: str, exc: BaseException | None) -> None:
        delay = backoff.next_delay()
        log.warning(
            "%s%s; retrying in %.2f s (failure %d in a row)",
            what,
            f": {_describe(exc)}" if exc is not None else "",
            delay,
            backoff.attempt,
        )
        await asyncio.sleep(delay)

    async def _unavailable(self, state: _ResourceState, exc: ApiException) -> None:
        """An optional resource that cannot be listed: none of it, and look again later."""
        if not state.unavailable:
            if state.resource.kind == "FlowExpectations" and exc.status == 404:
                why = (
                    f"the API does not serve {FLOWEXPECTATIONS_PLURAL}.{FLOWEXPECTATIONS_GROUP}/"
                    f"{FLOWEXPECTATIONS_VERSION} (is the CRD installed?)"
                )
            else:
                why = f"listing {state.resource.plural} was refused ({_describe(exc)})"
            log.warning(
                "%s; no expectations from %s, looking again every %.0f s",
                why,
                state.resource.plural,
                self.settings.missing_crd_retry_seconds,
            )
            state.unavailable = True
        state.resource_version = None
        self._inbox.put_nowait(_Replace(state.resource, ()))
        await asyncio.sleep(self.settings.missing_crd_retry_seconds)

    async def _unlistable(self, state: _ResourceState, exc: ApiException) -> None:
        """A discovered policy kind that cannot be listed. Forbidden (RBAC): its objects may exist
        anywhere, so the snapshot says so (an UnmodelledPolicy without a name makes every flow's
        model unknown) until a list succeeds. Gone (404: its CRD was just removed): none, until
        discovery drops it."""
        resource = state.resource
        what = f"{resource.label} ({resource.group}/{resource.version})"
        items: tuple[_Converted, ...] = ()
        if exc.status == 403:
            unknown = UnmodelledPolicy(resource.group, resource.version, resource.label)
            items = (_Converted("*", unknown),)
            if not state.unavailable:
                log.warning(
                    "listing %s is forbidden (%s): the model is unknown for every flow until it "
                    "can be listed (grant list and watch on %s); looking again every %.0f s",
                    what,
                    _describe(exc),
                    resource.key,
                    self.settings.missing_crd_retry_seconds,
                )
        elif not state.unavailable:
            log.info("%s is no longer served", what)
        state.unavailable = True
        state.resource_version = None
        self._inbox.put_nowait(_Replace(resource, items))
        await asyncio.sleep(self.settings.missing_crd_retry_seconds)

    # --- API discovery --------------------------------------------------------------------------

    def _discover_blocking(self) -> list[_Resource]:
        """The cluster policy kinds and other plugins' policy kinds the API serves now.

        `/apis` lists the groups; policy.networking.k8s.io is read in every version (each kind in
        the first of its versions that serves it), a plugin's group (a known domain) in its
        preferred version, keeping the kinds that filter traffic and can be listed and watched.
        """
        groups = self._json_body(self._apis.get_api_versions(_preload_content=False))
        found: list[_Resource] = []
        for group in groups.get("groups") or ():
            if not isinstance(group, Mapping) or not isinstance(group.get("name"), str):
                continue
            name = group["name"]
            versions = [
                v.get("version") for v in group.get("versions") or () if isinstance(v, Mapping)
            ]
            if name == CLUSTER_POLICY_GROUP:
                served: dict[str, Mapping[str, Any]] = {}
                for listed in versions:
                    for item in self._group_resources(name, str(listed)):
                        served.setdefault(f"{item.get('kind')}/{listed}", item)
                for cluster_kind, wanted in CLUSTER_POLICY_KINDS.items():
                    use = next((v for v in wanted if f"{cluster_kind}/{v}" in served), None)
                    if use is not None:
                        found.append(
                            _discovered(
                                cast(ObjectKind, cluster_kind),
                                name,
                                use,
                                served[f"{cluster_kind}/{use}"],
                            )
                        )
                continue
            if plugin_of(name) is None:
                continue
            preferred = group.get("preferredVersion")
            chosen = (
                preferred.get("version")
                if isinstance(preferred, Mapping)
                else (versions[0] if versions else None)
            )
            if not isinstance(chosen, str):
                continue
            for item in self._group_resources(name, chosen):
                api_kind = item.get("kind")
                if isinstance(api_kind, str) and is_plugin_policy_kind(name, api_kind):
                    found.append(_discovered("UnmodelledPolicy", name, chosen, item))
        return found

    def _group_resources(self, group: str, version: str) -> list[Mapping[str, Any]]:
        """The listable and watchable resources of one group version (no subresources)."""
        body = self._json_body(
            self._custom.get_api_resources(
                group, version, _preload_content=False, _request_timeout=self._request_timeout()
            )
        )
        return [
            item
            for item in body.get("resources") or ()
            if isinstance(item, Mapping)
            and isinstance(item.get("name"), str)
            and "/" not in item["name"]
            and {"list", "watch"} <= set(item.get("verbs") or ())
        ]

    def _json_body(self, response: object) -> Mapping[str, Any]:
        answer = cast(urllib3.BaseHTTPResponse, response)
        with self._tracked(answer):
            return _read_json(answer)

    async def _discoverer(self, tasks: asyncio.TaskGroup) -> None:
        """Discover the policy kinds every `discovery_interval_seconds`; watch the new ones and
        forget the ones the API no longer serves."""
        settings = self.settings
        backoff = Backoff(
            settings.backoff_initial_seconds,
            settings.backoff_max_seconds,
            settings.backoff_jitter,
            self._rng,
        )
        while True:
            try:
                found = await self._in_thread(self._discover_blocking)
            except _TRANSIENT as exc:
                await self._pause(backoff, "API discovery failed", exc)
                continue
            backoff.reset()
            self._use_discovered(found[:MAX_DISCOVERED_RESOURCES], tasks)
            if len(found) > MAX_DISCOVERED_RESOURCES:
                log.warning(
                    "API discovery found %d policy kinds; watching the first %d",
                    len(found),
                    MAX_DISCOVERED_RESOURCES,
                )
            self._discovered_once = True
            self._inbox.put_nowait(_Discovered())
            await asyncio.sleep(settings.discovery_interval_seconds)

    def _use_discovered(self, found: Sequence[_Resource], tasks: asyncio.TaskGroup) -> None:
        wanted = {r.key: r for r in found}
        for key in [k for k, s in self._states.items() if s.resource.discovered]:
            if wanted.get(key) != self._states[key].resource:
                resource = self._states.pop(key).resource
                task = self._reflectors.pop(key, None)
                if task is not None:
                    task.cancel()
                self._listed.discard(key)
                log.info("%s (%s) is no longer watched", resource.label, resource.key)
                self._inbox.put_nowait(_Replace(resource, ()))
        for key, resource in wanted.items():
            if key in self._states:
                continue
            state = _ResourceState(resource)
            self._states[key] = state
            self._store.setdefault(key, {})
            self._labels[key] = resource
            what = "watching the presence of" if resource.kind == "UnmodelledPolicy" else "watching"
            log.info(
                "API discovery: %s %s (%s/%s)",
                what,
                resource.label,
                resource.group,
                resource.version,
            )
            self._reflectors[key] = tasks.create_task(
                self._reflector(state), name=f"kube-reflector-{resource.key}"
            )

    async def _applier(self) -> None:
        """Apply what the reflectors read, in order, and publish snapshots."""
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            before: dict[tuple[str, str], _Model | None] = {}
            for entry in batch:
                if isinstance(entry, _Discovered):
                    continue
                gone = entry.resource.key not in self._states and entry.resource.discovered
                if gone and not (isinstance(entry, _Replace) and not entry.items):
                    continue  # a late result of a resource no longer watched: nothing stays
                if isinstance(entry, _Replace):
                    self._replace(entry, before)
                else:
                    self._apply_event(entry, before)
            if not self._synced.is_set():
                if self._discovered_once and set(self._states) <= self._listed:
                    await self._publish(InventoryUpdate(self._build_snapshot(), initial=True))
                    self._synced.set()
                continue
            changes = self._changes(before)
            if changes:
                await self._publish(InventoryUpdate(self._build_snapshot(), changes))

    def _replace(self, entry: _Replace, before: dict[tuple[str, str], _Model | None]) -> None:
        resource = entry.resource
        old = self._store.get(resource.key, {})
        new: dict[str, _Model] = {}
        for item in entry.items:
            if self._readable(resource, item):
                assert item.value is not None
                new[item.key] = item.value
        for key in old.keys() | new.keys():
            before.setdefault((resource.key, key), old.get(key))
        listed = {item.key for item in entry.items}
        for label, key in list(self._problems):
            if label == resource.label and key not in listed:
                del self._problems[(label, key)]
        self._store[resource.key] = new
        self._sorted_keys.pop(resource.key, None)
        if resource.key in self._states:
            self._listed.add(resource.key)
        if resource.kind == "FlowExpectations":
            self._objects = {
                item.key: item.object for item in entry.items if item.object is not None
            }

    def _apply_event(self, entry: _Event, before: dict[tuple[str, str], _Model | None]) -> None:
        resource = entry.resource
        store = self._store.setdefault(resource.key, {})
        key = entry.item.key
        before.setdefault((resource.key, key), store.get(key))
        if resource.kind == "FlowExpectations":
            if entry.deleted or entry.item.object is None:
                self._objects.pop(key, None)
            else:
                self._objects[key] = entry.item.object
        had = key in store
        if entry.deleted:
            store.pop(key, None)
            self._problems.pop((resource.label, key), None)
        elif self._readable(resource, entry.item):
            assert entry.item.value is not None
            store[key] = entry.item.value
        else:
            store.pop(key, None)  # its current state is not understood; an old one would mislead
        if had != (key in store):
            self._sorted_keys.pop(resource.key, None)

    def _readable(self, resource: _Resource, item: _Converted) -> bool:
        """True if the item has a value; log its problem and warnings, once each."""
        label = resource.label
        if item.warnings and self._warned.get((label, item.key)) != item.warnings:
            for warning in item.warnings:
                log.warning("%s %s: %s", label, item.key, warning)
            self._warned[(label, item.key)] = item.warnings
        if item.problem is None:
            self._problems.pop((label, item.key), None)
            return item.value is not None
        if self._problems.get((label, item.key)) != item.problem:
            if item.value is None:
                log.warning("%s %s is left out of the snapshot: %s", label, item.key, item.problem)
            else:
                log.warning(
                    "%s %s: documents left out of the snapshot:\n%s", label, item.key, item.problem
                )
            self._problems[(label, item.key)] = item.problem
        return item.value is not None

    def _changes(self, before: Mapping[tuple[str, str], _Model | None]) -> tuple[ObjectChange, ...]:
        changes: list[ObjectChange] = []
        for (resource_key, key), old in sorted(
            before.items(), key=lambda i: (_KIND_ORDER[self._labels[i[0][0]].kind], i[0])
        ):
            new = self._store.get(resource_key, {}).get(key)
            kind = self._labels[resource_key].kind
            namespace, _, name = key.rpartition("/")
            if old is None and new is None:
                continue
            if old is None:
                changes.append(ObjectChange(kind, namespace, name, "added"))
            elif new is None:
                changes.append(ObjectChange(kind, namespace, name, "deleted"))
            elif old != new:
                changes.append(
                    ObjectChange(kind, namespace, name, "modified", _changed_fields(old, new))
                )
        return tuple(changes)

    def _build_snapshot(self) -> Snapshot:
        def ordered(kind: ObjectKind) -> list[_Model]:
            found: list[_Model] = []
            for resource_key in sorted(self._store):
                if self._labels[resource_key].kind == kind:
                    store = self._store[resource_key]
                    keys = self._sorted_keys.get(resource_key)
                    if keys is None or len(keys) != len(store):
                        keys = self._sorted_keys[resource_key] = sorted(store)
                    found += [store[key] for key in keys]
            return found

        namespaces = [n for n in ordered("Namespace") if isinstance(n, Namespace)]
        expectations = [e for e in ordered("FlowExpectations") if isinstance(e, Expectations)]
        taken = {e.key: e.source for e in expectations}
        shadowed: dict[str, list[str]] = {}
        configmaps = self._store.get("configmaps", {})
        for key in sorted(configmaps):
            held = configmaps[key]
            assert isinstance(held, ConfigMapExpectations)
            for document in held.expectations:
                if document.key in taken:
                    shadowed.setdefault(key, []).append(
                        f"{document.source}: FlowExpectations {document.key} is already declared "
                        f"by {taken[document.key]}; this document is skipped"
                    )
                    continue
                taken[document.key] = document.source
                expectations.append(document)
        self._note_shadowed({key: "\n".join(why) for key, why in shadowed.items()})
        cluster_policies = [
            p
            for kind in CLUSTER_POLICY_KINDS
            for p in ordered(kind)  # type: ignore[arg-type]
            if isinstance(p, ClusterNetworkPolicy)
        ]
        warnings = tuple(
            f"api:{label} {key}: {w}"
            for (label, key), ws in sorted(self._warned.items())
            for w in ws
        )
        return Snapshot(
            namespaces={n.name: n for n in namespaces},
            pods=tuple(p for p in ordered("Pod") if isinstance(p, Pod)),
            policies=tuple(p for p in ordered("NetworkPolicy") if isinstance(p, NetworkPolicy)),
            expectations=tuple(expectations),
            cluster_policies=tuple(cluster_policies),
            unmodelled=tuple(
                u for u in ordered("UnmodelledPolicy") if isinstance(u, UnmodelledPolicy)
            ),
            warnings=warnings,
        )

    def _note_shadowed(self, shadowed: dict[str, str]) -> None:
        """Log each ConfigMap whose documents are declared elsewhere already, once per reason."""
        for key, why in shadowed.items():
            if self._shadowed.get(key) != why:
                log.warning("ConfigMap %s: documents left out of the snapshot:\n%s", key, why)
        self._shadowed = shadowed

    async def _publish(self, update: InventoryUpdate) -> None:
        self._snapshot = update.snapshot
        if self._on_update is not None:
            await self._on_update(update)


def _discovered(kind: ObjectKind, group: str, version: str, item: Mapping[str, Any]) -> _Resource:
    """A discovered resource from its APIResource entry."""
    return _Resource(
        kind=kind,
        plural=str(item["name"]),
        namespaced=bool(item.get("namespaced")),
        group=group,
        version=version,
        api_kind=str(item.get("kind") or "") if kind == "UnmodelledPolicy" else "",
        discovered=True,
    )


# --- direct requests (probe pods, owners) ---------------------------------------------------------


class KubeApiError(FlowproofError):
    """A request the API refused (`status` is its HTTP status) or that got no answer (None)."""

    def __init__(self, what: str, status: int | None, reason: str) -> None:
        self.what = what
        self.status = status
        self.reason = reason
        super().__init__(f"{what}: {reason}")


@dataclass(frozen=True)
class PodSummary:
    """What the collector needs to know of a pod it manages."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    terminating: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


OwnerKind = Literal["Namespace", "FlowExpectations"]


@dataclass(frozen=True)
class LeaseRecord:
    """The spec of a coordination.k8s.io/v1 Lease, and the version it was read at."""

    holder: str
    """`holderIdentity`; empty: released (anyone may take it at once)."""
    duration_seconds: int
    acquired_at: str
    """`acquireTime` as the API writes a MicroTime (RFC 3339, microseconds); "" when unset."""
    renewed_at: str
    transitions: int
    resource_version: str = ""

    def body(self, namespace: str, name: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        spec: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquired_at:
            spec["acquireTime"] = self.acquired_at
        if self.renewed_at:
            spec["renewTime"] = self.renewed_at
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }


def micro_time(at: float) -> str:
    """A MicroTime as the API writes it, for `at` seconds since the epoch."""
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease_record(body: Mapping[str, Any]) -> LeaseRecord:
    spec = body.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}

    def text(key: str) -> str:
        value = spec.get(key)
        return value if isinstance(value, str) else ""

    def number(key: str) -> int:
        value = spec.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    version = _metadata(body).get("resourceVersion")
    return LeaseRecord(
        holder=text("holderIdentity"),
        duration_seconds=number("leaseDurationSeconds"),
        acquired_at=text("acquireTime"),
        renewed_at=text("renewTime"),
        transitions=number("leaseTransitions"),
        resource_version=version if isinstance(version, str) else "",
    )


class KubeClient:
    """Single requests for the objects the collector itself manages (probe pods) and for the
    owners it names in them. The blocking client runs in this object's worker threads; a refused
    or failed request raises KubeApiError, never the client's exceptions.

    Use: `async with KubeClient(load_kube_config(...)) as client:`.
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        request_timeout_seconds: float = 30.0,
        list_page_size: int = 500,
    ) -> None:
        self._api = ApiClient(configuration)
        self._core = CoreV1Api(self._api)
        self._custom = CustomObjectsApi(self._api)
        self._coordination = CoordinationV1Api(self._api)
        self._timeout = (request_timeout_seconds, request_timeout_seconds)
        self._page_size = list_page_size
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="kube-client"
        )

    async def list_pods(self, label_selector: str) -> list[PodSummary]:
        """The pods of every namespace that `label_selector` selects."""

        def run() -> list[PodSummary]:
            pods: list[PodSummary] = []
            token: str | None = None
            while True:
                body = self._json(
                    self._core.list_pod_for_all_namespaces(
                        label_selector=label_selector,
                        limit=self._page_size,
                        _continue=token,
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                )
                items = body.get("items")
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, Mapping):
                        pods.append(_pod_summary(item))
                token = _metadata(body).get("continue") or None
                if token is None:
                    return pods

        return await self._call(f"listing pods ({label_selector})", run)

    async def create_pod(
        self, namespace: str, body: Mapping[str, Any]
    ) -> Literal["created", "exists"]:
        """Create a pod from `body` (as sent); "exists" when one of that name is there already."""
        name = _metadata(body).get("name")

        def run() -> Literal["created", "exists"]:
            try:
                self._json(
                    self._core.create_namespaced_pod(
                        namespace,
                        cast(Any, dict(body)),  # a dict is sent as it is
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                )
            except ApiException as exc:
                if exc.status == 409:
                    return "exists"
                raise
            return "created"

        return await self._call(f"creating pod {namespace}/{name}", run)

    async def delete_pod(
        self, namespace: str, name: str, *, uid: str | None = None
    ) -> Literal["deleted", "gone"]:
        """Delete a pod (only the one with `uid`, if given); "gone" when there is none."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            options["preconditions"] = {"uid": uid}

        def run() -> Literal["deleted", "gone"]:
            try:
                self._json(
                    self._core.delete_namespaced_pod(
                        name,
                        namespace,
                        body=cast(Any, options),
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                )
            except ApiException as exc:
                if exc.status == 404:
                    return "gone"
                raise
            return "deleted"

        return await self._call(f"deleting pod {namespace}/{name}", run)

    async def list_policy_reports(self, label_selector: str) -> dict[str, str]:
        """The PolicyReports `label_selector` selects, in every namespace: "ns/name" -> uid."""

        def run() -> dict[str, str]:
            body = self._json(
                self._custom.list_cluster_custom_object(
                    POLICY_REPORT_GROUP,
                    POLICY_REPORT_VERSION,
                    POLICY_REPORT_PLURAL,
                    label_selector=label_selector,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
            )
            found: dict[str, str] = {}
            for item in body.get("items") or ():
                meta = _metadata(item)
                key = _key_text(str(meta.get("namespace") or ""), str(meta.get("name") or ""))
                found[key] = str(meta.get("uid") or "")
            return found

        return await self._call("listing policy reports", run)

    async def put_policy_report(self, namespace: str, body: Mapping[str, Any]) -> str:
        """Create the PolicyReport `body` names, or replace its content; "created" or "updated"."""
        name = str(_metadata(body).get("name"))

        def run() -> str:
            try:
                self._json(
                    self._custom.create_namespaced_custom_object(
                        POLICY_REPORT_GROUP,
                        POLICY_REPORT_VERSION,
                        namespace,
                        POLICY_REPORT_PLURAL,
                        dict(body),
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                )
                return "created"
            except ApiException as exc:
                if exc.status != 409:
                    raise
            current = self._json(
                self._custom.get_namespaced_custom_object(
                    POLICY_REPORT_GROUP,
                    POLICY_REPORT_VERSION,
                    namespace,
                    POLICY_REPORT_PLURAL,
                    name,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
            )
            meta = {**_metadata(body), "resourceVersion": _metadata(current).get("resourceVersion")}
            self._json(
                self._custom.replace_namespaced_custom_object(
                    POLICY_REPORT_GROUP,
                    POLICY_REPORT_VERSION,
                    namespace,
                    POLICY_REPORT_PLURAL,
                    name,
                    {**body, "metadata": meta},
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
            )
            return "updated"

        return await self._call(f"writing policy report {namespace}/{name}", run)

    async def delete_policy_report(self, namespace: str, name: str, *, uid: str) -> str:
        """Delete the PolicyReport with this uid; "deleted" or "gone"."""

        def run() -> str:
            try:
                self._json(
                    self._custom.delete_namespaced_custom_object(
                        POLICY_REPORT_GROUP,
                        POLICY_REPORT_VERSION,
                        namespace,
                        POLICY_REPORT_PLURAL,
                        name,
                        body=cast(Any, {"preconditions": {"uid": uid}} if uid else {}),
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                )
            except ApiException as exc:
                if exc.status == 404:
                    return "gone"
                raise
            return "deleted"

        return await self._call(f"deleting policy report {namespace}/{name}", run)

    async def uid_of(self, kind: OwnerKind, namespace: str, name: str) -> str | None:
        """The uid of a Namespace (`namespace` "") or a FlowExpectations; None if there is none."""

        def run() -> str | None:
            response: object
            try:
                if kind == "Namespace":
                    response = self._core.read_namespace(
                        name, _preload_content=False, _request_timeout=self._timeout
                    )
                else:
                    response = self._custom.get_namespaced_custom_object(
                        FLOWEXPECTATIONS_GROUP,
                        FLOWEXPECTATIONS_VERSION,
                        namespace,
                        FLOWEXPECTATIONS_PLURAL,
                        name,
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                uid = _metadata(self._json(response)).get("uid")
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return uid if isinstance(uid, str) and uid else None

        return await self._call(f"reading {kind} {_key_text(namespace, name)}", run)

    async def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        """The Lease's record; None when there is none."""
        return await self._lease_request(
            f"reading lease {namespace}/{name}",
            404,
            self._coordination.read_namespaced_lease,
            name,
            namespace,
        )

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None:
        """Create the Lease with `record`; None when one of that name exists already."""
        return await self._lease_request(
            f"creating lease {namespace}/{name}",
            409,
            self._coordination.create_namespaced_lease,
            namespace,
            record.body(namespace, name),
        )

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None:
        """Write `record` over the Lease at `record.resource_version`; None when it changed
        since (409: another replica wrote first)."""
        return await self._lease_request(
            f"writing lease {namespace}/{name}",
            409,
            self._coordination.replace_namespaced_lease,
            name,
            namespace,
            record.body(namespace, name),
        )

    async def _lease_request(
        self, what: str, absent: int, request: Callable[..., object], *args: Any
    ) -> LeaseRecord | None:
        """One Lease request: the record the API answers, or None when it answers `absent`."""

        def run() -> LeaseRecord | None:
            try:
                response = request(*args, _preload_content=False, _request_timeout=self._timeout)
            except ApiException as exc:
                if exc.status == absent:
                    return None
                raise
            return _lease_record(self._json(response))

        return await self._call(what, run)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _json(response: object) -> Mapping[str, Any]:
        answer = cast(urllib3.BaseHTTPResponse, response)
        try:
            return _read_json(answer)
        finally:
            answer.release_conn()

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.wrap_future(self._pool.submit(fn))
        except ApiException as exc:
            raise KubeApiError(what, exc.status, _describe(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError, _StreamError, ConfigException) as exc:
            raise KubeApiError(what, None, _describe(exc)) from exc


class ApiObjects:
    """Blocking JSON requests on any API path, for code above the collector that plays a part
    of the cluster itself (the lab's mirror: kubelet, scheduler, namespace controller). The
    collector never uses it. Every method blocks: call it from a synchronous program or a
    worker thread, never from the event loop. A refused or failed request raises KubeApiError
    (`status` None when no answer came).

    Paths are the API's own (`/api/v1/namespaces/shop/pods/web`, `/apis/networking.k8s.io/v1/
    networkpolicies`); bodies and answers are the API's JSON, as dicts.
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        request_timeout_seconds: float = 30.0,
        list_page_size: int = 500,
    ) -> None:
        self._api = ApiClient(configuration)
        self._timeout = (request_timeout_seconds, request_timeout_seconds)
        self._page_size = list_page_size

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One request; its decoded answer ({} when the body is empty)."""
        what = f"{method} {path}"
        try:
            response = self._send(method, path, body, query, content_type, self._timeout)
            try:
                return dict(_read_json(response))
            finally:
                response.release_conn()
        except ApiException as exc:
            raise KubeApiError(what, exc.status, _describe(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError, _StreamError) as exc:
            raise KubeApiError(what, None, _describe(exc)) from exc

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when there is none (404)."""
        try:
            return self.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, path: str, *, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """Every item of the collection at `path` (page by page) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            query = {"limit": str(self._page_size)}
            if token:
                query["continue"] = token
            if label_selector:
                query["labelSelector"] = label_selector
            body = self.request("GET", path, query=query)
            raw = body.get("items")
            items += (
                [dict(i) for i in raw if isinstance(i, Mapping)] if isinstance(raw, list) else []
            )
            meta = _metadata(body)
            token = meta.get("continue") or None
            if token is None:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self, path: str, resource_version: str, *, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The events (type, object) of a watch of the collection at `path` from
        `resource_version`, with bookmarks, until the server ends it. An expired
        resourceVersion raises KubeApiError with status 410 (list again)."""
        what = f"watching {path}"
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = (self._timeout[0], timeout_seconds + self._timeout[1])
        try:
            response = self._send("GET", path, None, query, "application/json", timeout)
            try:
                for line in _lines(response):
                    event = json.loads(line)
                    obj = event.get("object") if isinstance(event, Mapping) else None
                    kind = event.get("type") if isinstance(event, Mapping) else None
                    if not isinstance(obj, Mapping) or not isinstance(kind, str):
                        raise _StreamError(f"a watch event without an object: {line[:200]!r}")
                    if kind == "ERROR":
                        raise KubeApiError(what, _integer(obj.get("code")), str(obj.get("message")))
                    yield kind, dict(obj)
            finally:
                response.close()
                response.release_conn()
        except ApiException as exc:
            raise KubeApiError(what, exc.status, _describe(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError, _StreamError, ValueError) as exc:
            raise KubeApiError(what, None, _describe(exc)) from exc

    def apply(self, path: str, body: Mapping[str, Any], *, field_manager: str) -> dict[str, Any]:
        """Server-side apply `body` at `path` (the object's own path), taking over conflicts."""
        return self.request(
            "PATCH",
            path,
            dict(body),
            query={"fieldManager": field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    def delete(
        self, path: str, *, uid: str | None = None, grace_period_seconds: int | None = None
    ) -> bool:
        """Delete the object at `path` (only the one with `uid`, if given); False when it was
        not there (404) or is another one now (409: the uid precondition failed)."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            options["preconditions"] = {"uid": uid}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        try:
            self.request("DELETE", path, options)
        except KubeApiError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> ApiObjects:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        body: object,
        query: Mapping[str, str] | None,
        content_type: str,
        timeout: tuple[float, float],
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self._api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        answer = self._api.call_api(*serialized, _request_timeout=timeout)
        if not 200 <= answer.status <= 299:
            answer.read()  # type: ignore[no-untyped-call]
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        return cast(urllib3.BaseHTTPResponse, answer.response)


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pod_summary(obj: Mapping[str, Any]) -> PodSummary:
    meta = _metadata(obj)
    labels = meta.get("labels")
    return PodSummary(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
        terminating=bool(meta.get("deletionTimestamp")),
    )


# --- helpers --------------------------------------------------------------------------------------


def _read_json(response: urllib3.BaseHTTPResponse) -> Mapping[str, Any]:
    try:
        body = json.loads(response.data or b"{}")
    except ValueError as exc:
        raise _StreamError(f"the API answered with something that is not JSON: {exc}") from exc
    if not isinstance(body, Mapping):
        raise _StreamError("the API answered with JSON that is not an object")
    return body


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed (chunked) response, as they arrive."""
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if line:
                yield line
    if tail := bytes(buffer).strip():
        yield tail


def _interrupt(response: urllib3.BaseHTTPResponse) -> None:
    """Unblock a thread reading `response` (shuts the socket down for reading)."""
    with contextlib.suppress(Exception):
        response.shutdown()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        message = ""
        with contextlib.suppress(ValueError, TypeError):
            message = str(json.loads(exc.body or "{}").get("message", ""))
        return f"HTTP {exc.status} {exc.reason or ''}{': ' + message if message else ''}".strip()
    return f"{type(exc).__name__}: {exc}"
