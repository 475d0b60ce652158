"""A fake Kubernetes API server for what the real one cannot be made to do on demand.

The tests run against a real kube-apiserver (tests/controlplane, lab/controlplane.py). This fake
stays for the faults a real API server shows only by accident: a connection dropped mid-stream
while the server keeps its history (`drop_connections`), a server that stalls every request
(`latency_seconds`, `hold`), 5xx answers on demand (`fail_next`), an event that never reaches a
watch (`update(silent=True)`: only a resync can repair it), and objects the real API server would
never store (a pod with an invalid IP, a FlowExpectations the CRD's validation refuses). It speaks
the real list/watch wire protocol: an aiohttp app on 127.0.0.1 (port 0, its own thread and event
loop) holding pods, namespaces, ConfigMaps, NetworkPolicies and FlowExpectations (and, once their
group is installed, policy.networking.k8s.io cluster policies and Cilium's policies, with API
discovery) under one global resourceVersion counter: paged lists, chunked `?watch=true` streams (history replay,
timeoutSeconds), `labelSelector`, GET of one object, POST and DELETE of pods, merge-patch of
`/status`, bearer-token auth. It is never used outside tests and never listens anywhere but
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

from aiohttp import web

T = TypeVar("T")
Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]

DEFAULT_WATCH_TIMEOUT_SECONDS: Final = 1800.0  # the API server's --min-request-timeout
CONTROL_TIMEOUT_SECONDS: Final = 10.0


@dataclass(frozen=True)
class ResourceType:
    """One served resource: where it lives in the API and what its objects are called."""

    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def builtin(self) -> bool:
        return self.group in ("", "networking.k8s.io", "events.k8s.io")

    @property
    def optional_group(self) -> bool:
        """Served only once its group is installed (a CRD the cluster may not have)."""
        return self.group in OPTIONAL_GROUPS


OPTIONAL_GROUPS: Final = frozenset({"policy.networking.k8s.io", "cilium.io"})


RESOURCES: Final[Mapping[str, ResourceType]] = {
    r.plural: r
    for r in (
        ResourceType("pods", "Pod", "", "v1", namespaced=True),
        ResourceType("namespaces", "Namespace", "", "v1", namespaced=False),
        ResourceType("configmaps", "ConfigMap", "", "v1", namespaced=True),
        ResourceType(
            "networkpolicies", "NetworkPolicy", "networking.k8s.io", "v1", namespaced=True
        ),
        ResourceType("events", "Event", "events.k8s.io", "v1", namespaced=True),
        ResourceType(
            "flowexpectations",
            "FlowExpectations",
            "flowproof.dev",
            "v1alpha1",
            namespaced=True,
            status_subresource=True,
        ),
        ResourceType(
            "clusternetworkpolicies",
            "ClusterNetworkPolicy",
            "policy.networking.k8s.io",
            "v1beta1",
            namespaced=False,
        ),
        ResourceType(
            "adminnetworkpolicies",
            "AdminNetworkPolicy",
            "policy.networking.k8s.io",
            "v1alpha1",
            namespaced=False,
        ),
        ResourceType(
            "baselineadminnetworkpolicies",
            "BaselineAdminNetworkPolicy",
            "policy.networking.k8s.io",
            "v1alpha1",
            namespaced=False,
        ),
        ResourceType("ciliumnetworkpolicies", "CiliumNetworkPolicy", "cilium.io", "v2", True),
        ResourceType(
            "ciliumclusterwidenetworkpolicies",
            "CiliumClusterwideNetworkPolicy",
            "cilium.io",
            "v2",
            namespaced=False,
        ),
        ResourceType("ciliumendpoints", "CiliumEndpoint", "cilium.io", "v2", namespaced=True),
    )
}
_BY_KIND: Final = {r.kind: r for r in RESOURCES.values()}


def resource_of(kind_or_plural: str) -> ResourceType:
    """The resource for a kind (`Pod`) or plural (`pods`)."""
    found = _BY_KIND.get(kind_or_plural) or RESOURCES.get(kind_or_plural)
    if found is None:
        raise KeyError(f"the fake API serves no {kind_or_plural!r}")
    return found


def status_object(code: int, reason: str, message: str) -> Obj:
    """A metav1.Status, as the API server sends for errors (also inside watch ERROR events)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: Obj = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


Selector = Callable[[Mapping[str, str]], bool]
_SET_REQUIREMENT: Final = re.compile(r"([^\s!=,()]+)\s+(in|notin)\s+\(([^()]*)\)")
_EQUALITY_REQUIREMENT: Final = re.compile(r"([^\s!=,()]+)\s*(==|=|!=)\s*([^\s!=,()]*)")
_KEY: Final = re.compile(r"[^\s!=,()]+")


def parse_label_selector(text: str) -> Selector:
    """A `labelSelector` query parameter as the API server reads it: requirements joined by
    commas, each `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` or `!k`.
    Raises ValueError on anything else."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (key, operator, values)
    for raw in _split_requirements(text):
        requirement = raw.strip()
        if found := _SET_REQUIREMENT.fullmatch(requirement):
            key, operator, listed = found.groups()
            values = frozenset(v.strip() for v in listed.split(",") if v.strip())
            requirements.append((key, operator, values))
        elif found := _EQUALITY_REQUIREMENT.fullmatch(requirement):
            key, operator, value = found.groups()
            requirements.append((key, "notin" if operator == "!=" else "in", frozenset({value})))
        elif requirement.startswith("!") and _KEY.fullmatch(requirement[1:].strip()):
            requirements.append((requirement[1:].strip(), "!", frozenset()))
        elif _KEY.fullmatch(requirement):
            requirements.append((requirement, "exists", frozenset()))
        else:
            raise ValueError(f"unable to parse requirement {requirement!r}")

    def matches(labels: Mapping[str, str]) -> bool:
        for key, operator, values in requirements:
            present = key in labels
            if operator == "exists" and not present:
                return False
            if operator == "!" and present:
                return False
            if operator == "in" and labels.get(key) not in values:
                return False
            if operator == "notin" and present and labels[key] in values:
                return False
        return True

    return matches


def _split_requirements(text: str) -> list[str]:
    """Split at the commas that are not inside a value list."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _as_seen(event: Obj, old: Obj | None, selector: Selector | None) -> Obj | None:
    """The event as a watch with `selector` sees it (the API server's cacher): an update that
    makes an object match is ADDED, one that makes it stop matching is DELETED (carrying the
    previous content at the new resourceVersion), anything else that does not match is not sent."""
    if selector is None or event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
        return event
    obj = event["object"]
    matches = selector(labels_of(obj))
    if event["type"] != "MODIFIED" or old is None:
        return event if matches else None
    matched = selector(labels_of(old))
    if matches and matched:
        return event
    if matches:
        return {"type": "ADDED", "object": obj}
    if matched:
        previous = copy.deepcopy(old)
        previous["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
        return {"type": "DELETED", "object": previous}
    return None


@dataclass(frozen=True)
class RequestRecord:
    """One request the fake served (controls excluded): method, path and query."""

    method: str
    path: str
    query: Mapping[str, str]
    at: float = 0.0  # time.monotonic() when it arrived (before any latency)
    accept: str = ""  # the Accept header

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")

    @property
    def plural(self) -> str | None:
        route = _parse_path(self.path)
        return None if route is None else route[0].plural


@dataclass(eq=False)
class _Watcher:
    resource: ResourceType
    namespace: str | None
    bookmarks: bool
    request: web.Request
    selector: Selector | None = None
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)


@dataclass
class _History:
    rv: int
    plural: str
    namespace: str
    event: Obj
    old: Obj | None = None  # the object before a MODIFIED event (for label selectors)


_END: Final = None  # queue sentinel: end the watch stream cleanly


class FakeApiServer:
    """The fake API server. Use as a context manager or call start() and stop().

    Controls are plain methods, safe to call from any thread (they run in the server's loop and
    return when applied). Every change fans out to the open watches of its resource at once.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        installed_groups: frozenset[str] = frozenset(),
    ) -> None:
        self.token = token
        self.installed_groups = set(installed_groups)
        """The optional groups (OPTIONAL_GROUPS) served, as if their CRDs were installed."""
        self.latency_seconds = 0.0
        """Every request waits this long before it is handled: a slow API server."""
        self.requests: list[RequestRecord] = []
        self.patches: list[tuple[str, str, Obj]] = []  # (content type, path, body)
        self.creations: list[tuple[str, Obj]] = []  # (path, body) of every POST, as received
        self.deletions: list[tuple[str, Obj | None]] = []  # (path, body) of every DELETE

        self._objects: dict[str, dict[tuple[str, str], Obj]] = {p: {} for p in RESOURCES}
        self._rv = 1
        self._history: list[_History] = []
        self._continues: dict[str, tuple[int, list[Obj]]] = {}
        self._watchers: set[_Watcher] = set()
        self._in_flight: dict[int, web.Request] = {}
        self._failures: list[tuple[int, str | None]] = []  # (status, path substring)
        self._forbidden: list[tuple[str, str | None]] = []  # (path substring, method or None)
        self._gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> FakeApiServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_app())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="fakeapi", daemon=True)
        self._thread.start()
        ready.wait(CONTROL_TIMEOUT_SECONDS)
        if failure:
            raise RuntimeError("the fake API server did not start") from failure[0]
        return self

    async def _start_app(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._stop_app(), loop).result(CONTROL_TIMEOUT_SECONDS)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(CONTROL_TIMEOUT_SECONDS)
        self._loop = self._thread = None

    async def _stop_app(self) -> None:
        assert self._gate is not None
        self._gate.set()
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(_END)
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _control(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the server's loop and return its result."""
        assert self._loop is not None, "the fake API server is not running"

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(CONTROL_TIMEOUT_SECONDS)

    # --- test controls ----------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        return str(self._rv)

    def create(self, obj: Mapping[str, Any]) -> Obj:
        """Add an object (kind and apiVersion say where); fills in uid, resourceVersion, etc."""
        return self._control(lambda: self._create(copy.deepcopy(dict(obj))))

    def update(self, obj: Mapping[str, Any], *, silent: bool = False) -> Obj:
        """Replace an object. `silent`: change it without any watch event (a missed event that
        only a relist can find)."""
        return self._control(lambda: self._update(copy.deepcopy(dict(obj)), silent=silent))

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        """Delete an object (namespace "" for namespaces); returns its final state."""
        return self._control(lambda: self._delete(resource_of(kind), namespace, name))

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        resource = resource_of(kind)
        found = self._objects[resource.plural].get((namespace if resource.namespaced else "", name))
        return copy.deepcopy(found)

    def objects(self, kind: str) -> list[Obj]:
        resource = resource_of(kind)
        return [copy.deepcopy(o) for _, o in sorted(self._objects[resource.plural].items())]

    def drop_connections(self) -> int:
        """Abort every open connection that is serving a request (watches included), with no
        clean end of the chunked stream. Returns how many were dropped."""

        def run() -> int:
            dropped = 0
            for request in list(self._in_flight.values()):
                transport = request.transport
                if transport is not None and not transport.is_closing():
                    transport.abort()
                    dropped += 1
            for watcher in self._watchers:
                watcher.queue.put_nowait(_END)
            return dropped

        return self._control(run)

    def fail_next(self, count: int, *, status: int = 500, path_contains: str | None = None) -> None:
        """Answer the next `count` requests (whose path contains `path_contains`) with `status`."""
        self._control(lambda: self._failures.extend([(status, path_contains)] * count))

    def forbid(self, path_contains: str, *, method: str | None = None) -> None:
        """From now on, answer 403 Forbidden (as RBAC does) to every request whose path contains
        `path_contains` (and whose method is `method`, if given)."""
        self._control(lambda: self._forbidden.append((path_contains, method)))

    def install_group(self, group: str, *, installed: bool = True) -> None:
        """Serve an optional group from now on (or stop serving it), as a CRD install does."""
        if group not in OPTIONAL_GROUPS:
            raise KeyError(f"{group!r} is not an optional group of the fake")
        self._control(
            lambda: (
                self.installed_groups.add(group)
                if installed
                else self.installed_groups.discard(group)
            )
        )

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, new requests wait (before they are looked at) until the block ends."""

        def close() -> None:
            assert self._gate is not None
            self._gate.clear()

        def open_() -> None:
            assert self._gate is not None
            self._gate.set()

        self._control(close)
        try:
            yield
        finally:
            self._control(open_)

    def open_watches(self, kind: str | None = None) -> int:
        """How many watches are open (of one kind, or all)."""
        plural = resource_of(kind).plural if kind else None
        return self._control(
            lambda: sum(1 for w in self._watchers if plural in (None, w.resource.plural))
        )

    def requests_for(self, kind: str, *, watch: bool | None = None) -> list[RequestRecord]:
        """The GET requests served for a resource; `watch` picks watches or lists."""
        plural = resource_of(kind).plural
        return [
            r
            for r in list(self.requests)
            if r.method == "GET" and r.plural == plural and (watch is None or r.is_watch == watch)
        ]

    # --- the store --------------------------------------------------------------------------------

    @staticmethod
    def _key(resource: ResourceType, meta: Mapping[str, Any]) -> tuple[str, str]:
        namespace = str(meta.get("namespace") or "default") if resource.namespaced else ""
        return namespace, str(meta["name"])

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(
        self, resource: ResourceType, event_type: EventType, obj: Obj, old: Obj | None = None
    ) -> None:
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        namespace = str(obj["metadata"].get("namespace", ""))
        old = copy.deepcopy(old)
        self._history.append(_History(self._rv, resource.plural, namespace, event, old))
        for watcher in self._watchers:
            if watcher.resource is resource and watcher.namespace in (None, namespace):
                seen = _as_seen(event, old, watcher.selector)
                if seen is not None:
                    watcher.queue.put_nowait(seen)

    def _create(self, obj: Obj) -> Obj:
        resource = resource_of(str(obj.get("kind")))
        meta = obj.setdefault("metadata", {})
        key = self._key(resource, meta)
        if key in self._objects[resource.plural]:
            raise ValueError(f"{resource.kind} {'/'.join(filter(None, key))} already exists")
        if resource.namespaced:
            meta["namespace"] = key[0]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = 1
        if resource.kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = key[1]
        obj["apiVersion"] = resource.api_version
        meta["resourceVersion"] = self._next_rv()
        self._objects[resource.plural][key] = obj
        self._record(resource, "ADDED", obj)
        return copy.deepcopy(obj)

    def _update(self, obj: Obj, *, silent: bool) -> Obj:
        resource = resource_of(str(obj.get("kind")))
        meta = obj.setdefault("metadata", {})
        key = self._key(resource, meta)
        old = self._objects[resource.plural].get(key)
        if old is None:
            raise KeyError(f"{resource.kind} {'/'.join(filter(None, key))} does not exist")
        for kept in ("uid", "creationTimestamp"):
            meta[kept] = old["metadata"][kept]
        if resource.namespaced:
            meta["namespace"] = key[0]
        if resource.kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = key[1]
        if resource.status_subresource:
            obj.pop("status", None)  # the main resource ignores status, as the real one does
            if "status" in old:
                obj["status"] = copy.deepcopy(old["status"])
        meta["generation"] = old["metadata"].get("generation", 1) + (
            obj.get("spec") != old.get("spec")
        )
        obj["apiVersion"] = resource.api_version
        meta["resourceVersion"] = self._next_rv()
        self._objects[resource.plural][key] = obj
        if not silent:
            self._record(resource, "MODIFIED", obj, old)
        return copy.deepcopy(obj)

    def _delete(self, resource: ResourceType, namespace: str, name: str) -> Obj:
        key = (namespace if resource.namespaced else "", name)
        old = self._objects[resource.plural].pop(key, None)
        if old is None:
            raise KeyError(f"{resource.kind} {'/'.join(filter(None, key))} does not exist")
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._record(resource, "DELETED", final)
        return final

    # --- HTTP -------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        self._in_flight[id(request)] = request
        try:
            if self.latency_seconds > 0:
                await asyncio.sleep(self.latency_seconds)
            assert self._gate is not None
            await self._gate.wait()
            return await self._dispatch(request, arrived)
        finally:
            self._in_flight.pop(id(request), None)

    async def _dispatch(self, request: web.Request, arrived: float) -> web.StreamResponse:
        path = request.path
        if path == "/version":
            return web.json_response(
                {"major": "1", "minor": "37", "gitVersion": "v1.37.0-fakeapi", "platform": "fake"}
            )
        self.requests.append(
            RequestRecord(
                request.method,
                path,
                dict(request.query),
                arrived,
                request.headers.get("Accept", ""),
            )
        )
        if self.token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or given.strip() != self.token:
                return _error(401, "Unauthorized", "Unauthorized")
        for i, (status, contains) in enumerate(self._failures):
            if contains is None or contains in path:
                del self._failures[i]
                return _error(status, "InternalError", f"injected failure {status}")
        for contains, method in self._forbidden:
            if contains in path and method in (None, request.method):
                return _error(
                    403,
                    "Forbidden",
                    f'{request.method} {path} is forbidden: User "system:serviceaccount:'
                    'flowproof:flowproof-collector" cannot do this',
                )

        if request.method == "GET" and (discovery := self._discovery(path)) is not None:
            return discovery
        route = _parse_path(path)
        if route is None:
            return _error(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        resource, namespace, name, subresource = route
        if not self._served(resource):
            return _error(404, "NotFound", "the server could not find the requested resource")

        selector: Selector | None = None
        if request.query.get("labelSelector"):
            try:
                selector = parse_label_selector(request.query["labelSelector"])
            except ValueError as exc:
                return _error(400, "BadRequest", f"labelSelector: {exc}")
        if request.method == "GET" and name is None:
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace, selector)
            return self._list(request, resource, namespace, selector)
        if request.method == "GET" and name is not None and subresource is None:
            found = self._objects[resource.plural].get((namespace or "", name))
            if found is None:
                return _error(404, "NotFound", f'{resource.plural} "{name}" not found')
            return web.json_response(found)
        if request.method == "POST" and name is None:
            return await self._post(request, resource, namespace)
        if request.method == "DELETE" and name is not None and subresource is None:
            return await self._delete_request(request, resource, namespace or "", name)
        if request.method == "PATCH" and name is not None and subresource == "status":
            return await self._patch_status(request, resource, namespace or "", name)
        return _error(405, "MethodNotAllowed", f"{request.method} {path} is not served by the fake")

    def _served(self, resource: ResourceType) -> bool:
        return not resource.optional_group or resource.group in self.installed_groups

    def _discovery(self, path: str) -> web.Response | None:
        """`/apis` (an APIGroupList) and `/apis/GROUP/VERSION` (an APIResourceList) of what is
        served now; None for any other path."""
        parts = [p for p in path.split("/") if p]
        served = [r for r in RESOURCES.values() if r.group and self._served(r)]
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for r in served:
                versions = groups.setdefault(r.group, [])
                if r.version not in versions:
                    versions.append(r.version)
            return web.json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": group,
                            "versions": [
                                {"groupVersion": f"{group}/{v}", "version": v} for v in versions
                            ],
                            "preferredVersion": {
                                "groupVersion": f"{group}/{versions[0]}",
                                "version": versions[0],
                            },
                        }
                        for group, versions in groups.items()
                    ],
                }
            )
        if len(parts) == 3 and parts[0] == "apis":
            found = [r for r in served if (r.group, r.version) == (parts[1], parts[2])]
            if not found:
                return _error(404, "NotFound", f"the server could not find {path}")
            resources: list[Obj] = []
            for r in found:
                resources.append(
                    {
                        "name": r.plural,
                        "singularName": r.kind.lower(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["get", "list", "watch", "create", "delete", "patch", "update"],
                    }
                )
                if r.status_subresource:
                    resources.append(
                        {
                            "name": f"{r.plural}/status",
                            "namespaced": r.namespaced,
                            "kind": r.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
            return web.json_response(
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": f"{parts[1]}/{parts[2]}",
                    "resources": resources,
                }
            )
        return None

    def _list(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str | None,
        selector: Selector | None,
    ) -> web.StreamResponse:
        if request.query.get("fieldSelector"):
            return _error(400, "BadRequest", "the fake API does not support fieldSelector")
        token = request.query.get("continue")
        if token:
            found = self._continues.pop(token, None)
            if found is None:
                return _error(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter.",
                )
            list_rv, remaining = found
        else:
            list_rv = self._rv
            remaining = [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects[resource.plural].items())
                if (namespace is None or ns == namespace)
                and (selector is None or selector(labels_of(obj)))
            ]
            if resource.builtin:
                for obj in remaining:
                    # A typed list (PodList) leaves kind and apiVersion out of its items.
                    obj.pop("kind", None)
                    obj.pop("apiVersion", None)
        limit = int(request.query.get("limit") or 0)
        page, rest = (remaining[:limit], remaining[limit:]) if limit > 0 else (remaining, [])
        metadata: Obj = {"resourceVersion": str(list_rv)}
        if rest:
            next_token = uuid.uuid4().hex
            self._continues[next_token] = (list_rv, rest)
            metadata["continue"] = next_token
            metadata["remainingItemCount"] = len(rest)
        return web.json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": page,
            }
        )

    async def _watch(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str | None,
        selector: Selector | None,
    ) -> web.StreamResponse:
        rv_text = request.query.get("resourceVersion", "")
        try:
            timeout = float(request.query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_SECONDS)
        except ValueError:
            return _error(400, "BadRequest", "timeoutSeconds must be a number")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")

        initial: list[Obj] = []
        if rv_text in ("", "0"):
            # "Get state and start at most recent": synthetic ADDED events for what exists.
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(obj)}
                for (ns, _), obj in sorted(self._objects[resource.plural].items())
                if (namespace is None or ns == namespace)
                and (selector is None or selector(labels_of(obj)))
            ]
        else:
            try:
                since = int(rv_text)
            except ValueError:
                return _error(400, "BadRequest", f"invalid resourceVersion {rv_text!r}")
            replayed = (
                _as_seen(h.event, h.old, selector)
                for h in self._history
                if h.rv > since and h.plural == resource.plural and namespace in (None, h.namespace)
            )
            initial = [event for event in replayed if event is not None]

        # Registered before anything is awaited: no change can slip between replay and live.
        watcher = _Watcher(resource, namespace, bookmarks, request, selector)
        self._watchers.add(watcher)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for event in initial:
                await _send(response, event)
            await _stream(response, watcher.queue, timeout)
            await response.write_eof()
        except ConnectionError:
            pass  # dropped: the client sees a broken chunked stream
        finally:
            self._watchers.discard(watcher)
        return response

    async def _post(
        self, request: web.Request, resource: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        """Create an object (the API's POST to the collection)."""
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "BadRequest", "the body is not JSON")
        self.creations.append((request.path, copy.deepcopy(body)))
        if not isinstance(body, dict):
            return _error(400, "BadRequest", "the body is not an object")
        meta = body.setdefault("metadata", {})
        body.setdefault("kind", resource.kind)
        if body.get("kind") != resource.kind:
            return _error(
                400, "BadRequest", f"kind {body.get('kind')!r} posted to {resource.plural}"
            )
        if resource.namespaced:
            if namespace is None:
                return _error(405, "MethodNotAllowed", "create a namespaced object in a namespace")
            given = meta.get("namespace")
            if given not in (None, "", namespace):
                return _error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request",
                )
            meta["namespace"] = namespace
            if ("", namespace) not in self._objects["namespaces"]:
                return _error(404, "NotFound", f'namespaces "{namespace}" not found')
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:10]}"
        if not meta.get("name"):
            return _error(422, "Invalid", "metadata.name: Required value: name is required")
        if self._key(resource, meta) in self._objects[resource.plural]:
            return _error(
                409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists'
            )
        for server_owned in ("uid", "resourceVersion", "creationTimestamp", "generation"):
            meta.pop(server_owned, None)
        return web.json_response(self._create(body), status=201)

    async def _delete_request(
        self, request: web.Request, resource: ResourceType, namespace: str, name: str
    ) -> web.StreamResponse:
        """Delete one object (at once: the fake has no kubelet to wait for)."""
        raw = await request.read()
        try:
            options = json.loads(raw) if raw else None
        except ValueError:
            return _error(400, "BadRequest", "the body is not JSON")
        self.deletions.append((request.path, copy.deepcopy(options)))
        key = (namespace if resource.namespaced else "", name)
        found = self._objects[resource.plural].get(key)
        if found is None:
            return _error(404, "NotFound", f'{resource.plural} "{name}" not found')
        preconditions = options.get("preconditions") if isinstance(options, dict) else None
        wanted = preconditions.get("uid") if isinstance(preconditions, dict) else None
        if wanted and wanted != found["metadata"]["uid"]:
            return _error(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {wanted}, UID in object meta: "
                f"{found['metadata']['uid']}",
            )
        return web.json_response(self._delete(resource, namespace, name))

    async def _patch_status(
        self, request: web.Request, resource: ResourceType, namespace: str, name: str
    ) -> web.StreamResponse:
        if not resource.status_subresource:
            return _error(404, "NotFound", f"{resource.plural} has no status subresource")
        content_type = request.headers.get("Content-Type", "")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "BadRequest", "the body is not JSON")
        self.patches.append((content_type, request.path, body))
        if content_type.split(";")[0].strip() != "application/merge-patch+json":
            return _error(
                415,
                "UnsupportedMediaType",
                f"the fake accepts merge patches only, not {content_type!r}",
            )
        key = (namespace, name)
        old = self._objects[resource.plural].get(key)
        if old is None:
            return _error(404, "NotFound", f'{resource.plural}.{resource.group} "{name}" not found')
        patched = merge_patch(old, body)
        assert isinstance(patched, dict)
        new = copy.deepcopy(old)
        if "status" in patched:
            new["status"] = patched["status"]  # the status subresource changes status only
        else:
            new.pop("status", None)
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[resource.plural][key] = new
        self._record(resource, "MODIFIED", new, old)
        return web.json_response(new)


# --- helpers --------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_object(code, reason, message), status=code)


def _parse_path(
    path: str,
) -> tuple[ResourceType, str | None, str | None, str | None] | None:
    """(resource, namespace, name, subresource) of an API path, None if not served."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    resource = RESOURCES.get(rest[0])
    if resource is None or resource.group != group or resource.version != version:
        return None
    if namespace is not None and not resource.namespaced:
        return None
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if len(rest) > 3:
        return None
    return resource, namespace, name, subresource


async def _send(response: web.StreamResponse, event: Obj) -> None:
    await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


async def _stream(
    response: web.StreamResponse, queue: asyncio.Queue[Obj | None], duration: float
) -> None:
    """Send the queued events until the end sentinel or until `duration` (timeoutSeconds) ends."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration):
            while (event := await queue.get()) is not _END:
                await _send(response, event)
