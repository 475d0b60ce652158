"""KubernetesSource: the cluster, listed and watched, as immutable snapshots and exact changes.

Owns client configuration (kubeconfig or in-cluster), list+watch of pods, namespaces, NetworkPolicies,
FlowExpectations and (opt-in) labelled ConfigMaps of expectations (resourceVersions, bookmarks, 410
-> relist, backoff, resync), the store, the FlowExpectations status patch, and KubeClient (probe
pods: create, list, delete). The only module that imports `kubernetes`: the blocking client runs in
worker threads, never on the event loop, and API objects become model objects here, once. A
malformed object is logged once and left out; nothing in an object can stop the loop.

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
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, cast

import urllib3
import yaml
from kubernetes.client import (
    ApiClient,
    Configuration,
    CoreV1Api,
    CustomObjectsApi,
    EventsV1Api,
    NetworkingV1Api,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from collector.core.model import Expectations, Namespace, NetworkPolicy, Pod, Snapshot
from collector.reading.expectations import expectations_from_configmap, expectations_from_dict
from collector.reading.fields import Where
from collector.reading.objects import namespace_from_dict, pod_from_dict, policy_from_dict
from flowproof.aio import Backoff
from flowproof.errors import ConfigurationError, FlowproofError, InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
ObjectKind = Literal["Namespace", "Pod", "NetworkPolicy", "FlowExpectations", "ConfigMap"]
Action = Literal["added", "modified", "deleted"]
KubeConfiguration = Configuration
"""The client configuration `load_kube_config` returns (for annotations outside this module)."""

SERVICE_TOKEN_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CA_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
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
    expectations from there (the rest syncs without waiting)."""
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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_Model = Namespace | Pod | NetworkPolicy | Expectations | ConfigMapExpectations


# --- conversion (the one place API objects become model objects) ----------------------------------


@dataclass(frozen=True)
class _Resource:
    kind: ObjectKind
    plural: str
    namespaced: bool


_RESOURCES: Final[tuple[_Resource, ...]] = (
    _Resource("Namespace", "namespaces", namespaced=False),
    _Resource("Pod", "pods", namespaced=True),
    _Resource("NetworkPolicy", "networkpolicies", namespaced=True),
    _Resource("FlowExpectations", FLOWEXPECTATIONS_PLURAL, namespaced=True),
    _Resource("ConfigMap", "configmaps", namespaced=True),
)
_OPTIONAL: Final = frozenset({"FlowExpectations", "ConfigMap"})
"""Resources whose absence (no CRD, no RBAC) leaves the snapshot without them, never waiting."""
_KIND_ORDER: Final = {r.kind: i for i, r in enumerate(_RESOURCES)}
_BY_KIND: Final = {r.kind: r for r in _RESOURCES}


@dataclass(frozen=True)
class _Converted:
    """An API object read into the model; `value` None with `problem` set if it could not be.

    A ConfigMap may have both: the documents that could be read, and why the others could not.
    """

    key: str
    value: _Model | None
    problem: str | None = None
    object: ExpectationsObject | None = None  # FlowExpectations only


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


def _convert(resource_kind: ObjectKind, obj: Mapping[str, Any]) -> _Converted:
    """Read one API object (a dict as the API sends it) into the model; never raises."""
    resource = _BY_KIND[resource_kind]
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
    where = Where(file=f"api:{path}")
    try:
        value: _Model
        if resource.kind == "Pod":
            pod = pod_from_dict(obj, where)
            if _metadata(obj).get("deletionTimestamp"):
                pod = dataclasses.replace(pod, phase=TERMINATING_PHASE)
            value = pod
        elif resource.kind == "Namespace":
            value = namespace_from_dict(obj, where)
        elif resource.kind == "NetworkPolicy":
            value = policy_from_dict(obj, where)
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
        log.exception("reading %s %s failed", resource.kind, key)
        return _with_object(resource, obj, _Converted(key, None, f"could not be read: {exc!r}"))
    return _with_object(resource, obj, _Converted(key, value))


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

    kind: ObjectKind
    items: Sequence[_Converted]


@dataclass(frozen=True)
class _Event:
    """One watch event of one resource."""

    kind: ObjectKind
    deleted: bool
    item: _Converted


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
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self._resources) + 4, thread_name_prefix="kube-inventory"
        )
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._in_flight_lock = threading.Lock()
        self._stopping = _Stopping()
        self._states = {r.kind: _ResourceState(r) for r in self._resources}
        self._inbox: asyncio.Queue[_Replace | _Event] = asyncio.Queue()
        self._store: dict[ObjectKind, dict[str, _Model]] = {r.kind: {} for r in _RESOURCES}
        self._objects: dict[str, ExpectationsObject] = {}
        self._listed: set[ObjectKind] = set()
        self._problems: dict[tuple[ObjectKind, str], str] = {}
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
        found = {f"{kind} {key}": why for (kind, key), why in sorted(self._problems.items())}
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
                for state in self._states.values():
                    tasks.create_task(
                        self._reflector(state), name=f"kube-reflector-{state.resource.plural}"
                    )
        finally:
            self._running = False
            await self._stop_threads()

    async def update_expectations_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> bool:
        """Merge-patch the `/status` subresource of a FlowExpectations object.

        Returns False (and logs why, once per object and reason) when the object is gone or the
        API refused; never raises for the API's answer.
        """
        body = {"status": dict(status)}

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
        except _TRANSIENT as exc:
            why = _describe(exc)
            if self._status_failures.get(key) != why:  # once per distinct reason
                log.warning("cannot update the status of FlowExpectations %s: %s", key, why)
                self._status_failures[key] = why
            return False
        self._status_failures.pop(key, None)
        return True

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
            "metadata": {"generateName": f"{regarding.name}.", "namespace": regarding.namespace},
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

    def _lister(self, resource: _Resource) -> Callable[..., object]:
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
                    items.append(_convert(resource.kind, raw))
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
            self._lister(resource)(
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
                        item = _convert(resource.kind, obj)
                    emit(_Event(resource.kind, kind == "DELETED", item))
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
                    await self._pause(backoff, f"listing {resource.plural} failed", exc)
                    continue
                except _TRANSIENT as exc:
                    await self._pause(backoff, f"listing {resource.plural} failed", exc)
                    continue
                if state.unavailable:
                    log.info("%s can be listed now", resource.plural)
                    state.unavailable = False
                self._inbox.put_nowait(_Replace(resource.kind, items))
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
        self._inbox.put_nowait(_Replace(state.resource.kind, ()))
        await asyncio.sleep(self.settings.missing_crd_retry_seconds)

    async def _applier(self) -> None:
        """Apply what the reflectors read, in order, and publish snapshots."""
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            before: dict[tuple[ObjectKind, str], _Model | None] = {}
            for entry in batch:
                if isinstance(entry, _Replace):
                    self._replace(entry, before)
                else:
                    self._apply_event(entry, before)
            if not self._synced.is_set():
                if len(self._listed) == len(self._resources):
                    await self._publish(InventoryUpdate(self._build_snapshot(), initial=True))
                    self._synced.set()
                continue
            changes = self._changes(before)
            if changes:
                await self._publish(InventoryUpdate(self._build_snapshot(), changes))

    def _replace(
        self, entry: _Replace, before: dict[tuple[ObjectKind, str], _Model | None]
    ) -> None:
        old = self._store[entry.kind]
        new: dict[str, _Model] = {}
        for item in entry.items:
            if self._readable(entry.kind, item):
                assert item.value is not None
                new[item.key] = item.value
        for key in old.keys() | new.keys():
            before.setdefault((entry.kind, key), old.get(key))
        listed = {item.key for item in entry.items}
        for kind, key in list(self._problems):
            if kind == entry.kind and key not in listed:
                del self._problems[(kind, key)]
        self._store[entry.kind] = new
        self._listed.add(entry.kind)
        if entry.kind == "FlowExpectations":
            self._objects = {
                item.key: item.object for item in entry.items if item.object is not None
            }

    def _apply_event(
        self, entry: _Event, before: dict[tuple[ObjectKind, str], _Model | None]
    ) -> None:
        store = self._store[entry.kind]
        key = entry.item.key
        before.setdefault((entry.kind, key), store.get(key))
        if entry.kind == "FlowExpectations":
            if entry.deleted or entry.item.object is None:
                self._objects.pop(key, None)
            else:
                self._objects[key] = entry.item.object
        if entry.deleted:
            store.pop(key, None)
            self._problems.pop((entry.kind, key), None)
        elif self._readable(entry.kind, entry.item):
            assert entry.item.value is not None
            store[key] = entry.item.value
        else:
            store.pop(key, None)  # its current state is not understood; an old one would mislead

    def _readable(self, kind: ObjectKind, item: _Converted) -> bool:
        """True if the item has a value; log its problem, once per distinct problem."""
        if item.problem is None:
            self._problems.pop((kind, item.key), None)
            return item.value is not None
        if self._problems.get((kind, item.key)) != item.problem:
            if item.value is None:
                log.warning("%s %s is left out of the snapshot: %s", kind, item.key, item.problem)
            else:
                log.warning(
                    "%s %s: documents left out of the snapshot:\n%s", kind, item.key, item.problem
                )
            self._problems[(kind, item.key)] = item.problem
        return item.value is not None

    def _changes(
        self, before: Mapping[tuple[ObjectKind, str], _Model | None]
    ) -> tuple[ObjectChange, ...]:
        changes: list[ObjectChange] = []
        for (kind, key), old in sorted(
            before.items(), key=lambda i: (_KIND_ORDER[i[0][0]], i[0][1])
        ):
            new = self._store[kind].get(key)
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
            store = self._store[kind]
            return [store[key] for key in sorted(store)]

        namespaces = [n for n in ordered("Namespace") if isinstance(n, Namespace)]
        expectations = [e for e in ordered("FlowExpectations") if isinstance(e, Expectations)]
        taken = {e.key: e.source for e in expectations}
        shadowed: dict[str, list[str]] = {}
        configmaps = self._store["ConfigMap"]
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
        return Snapshot(
            namespaces={n.name: n for n in namespaces},
            pods=tuple(p for p in ordered("Pod") if isinstance(p, Pod)),
            policies=tuple(p for p in ordered("NetworkPolicy") if isinstance(p, NetworkPolicy)),
            expectations=tuple(expectations),
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
