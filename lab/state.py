"""The lab's state on disk: every object it created, its cluster, faults and enforcement.

Owns `<state-dir>/<name>/state.json` (written atomically, and always BEFORE the objects it names
are created, so `lab down` can clean up after a crash) and the per-lab lock that serialises the
commands, the lag applier and `down`. It must never create or remove system objects itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.core.model import ContainerPort, Pod, Protocol
from lab.config import LabSettings, Names
from lab.errors import LabError, NoSuchLabError
from lab.system import is_running

STATE_VERSION = 1


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new.

    No fsync: what must survive is a killed lab command, and the page cache holds its writes;
    a power cut takes the namespaces and processes the state describes with it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class ProcessRecord:
    """A process the lab started: pid plus its start time, so a recycled pid is never killed."""

    pid: int
    start: int  # field 22 of /proc/PID/stat (clock ticks after boot)
    role: str


@dataclass
class RouteRecord:
    """A blackhole route in the host namespace, told apart from other labs' by its metric."""

    dst: str
    metric: int


@dataclass
class PodRecord:
    """One running lab pod: what Kubernetes would know about it plus where the lab put it."""

    namespace: str
    name: str
    uid: str
    node: int
    ip: str
    index: int
    container_id: str
    netns: str  # the pod's namespace, or the node's for a hostNetwork pod
    veth: str  # node-side veth name ("" for hostNetwork pods)
    cgroup: str  # relative to the cgroup root
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[tuple[int, Protocol, str | None]] = field(default_factory=list)
    workload: str | None = None
    host_network: bool = False
    managed: bool = False  # added by the lab itself (the cluster DNS when none was given)
    server: ProcessRecord | None = None
    server_spec: str = ""  # digest of the running server's spec: restart when it changes

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def container_ports(self) -> tuple[ContainerPort, ...]:
        return tuple(ContainerPort(port=p, protocol=proto, name=n) for p, proto, n in self.ports)

    def to_pod(self) -> Pod:
        """The pod as the model (and the collector) sees it."""
        return Pod(
            namespace=self.namespace,
            name=self.name,
            labels=dict(self.labels),
            ports=self.container_ports,
            ips=(self.ip,),
            uid=self.uid,
            node=Names.node_name(self.node),
            host_network=self.host_network,
            workload=self.workload,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PodRecord:
        values = dict(data)
        values["ports"] = [(int(p), _protocol(proto), n) for p, proto, n in values.get("ports", [])]
        server = values.get("server")
        values["server"] = ProcessRecord(**server) if server else None
        return cls(**values)


def _protocol(text: str) -> Protocol:
    if text == "UDP":
        return "UDP"
    if text == "SCTP":
        return "SCTP"
    return "TCP"


@dataclass
class Faults:
    """How enforcement deviates from the policies (`lab fault`)."""

    ignore_policies: list[str] = field(default_factory=list)
    lag_seconds: float = 0.0
    reject: bool = False
    ignore_named_ports: bool = False
    ignore_endport: bool = False

    def describe(self) -> list[str]:
        parts = [f"ignore-policy {key}" for key in self.ignore_policies]
        if self.lag_seconds:
            parts.append(f"lag {self.lag_seconds:g}s")
        if self.reject:
            parts.append("reject")
        if self.ignore_named_ports:
            parts.append("ignore-named-ports")
        if self.ignore_endport:
            parts.append("ignore-endport")
        return parts


@dataclass
class LoopRecord:
    """The lab's loop: a collector on loopback ports and one agent per node (see lab/loop.py).

    `settings` is the LoopSettings it was started with (as a dict); the processes themselves are
    in `LabState.processes` with roles `collector` and `agent node-N`.
    """

    http_port: int
    grpc_port: int
    token_file: str
    settings: dict[str, Any] = field(default_factory=dict)
    ca_file: str = ""  # the lab's throwaway CA (lab/certs.py): agents trust only it
    cert_file: str = ""  # the collector's certificate and key, issued by that CA
    key_file: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


APISERVER_ROLES = ("etcd", "kube-apiserver", "mirror")
"""The processes of a lab's own API server, as LabState.processes records them."""


@dataclass
class ApiServerRecord:
    """The lab's own API server (`lab up --apiserver`, lab/mirroring.py): etcd and kube-apiserver
    on loopback ports, their files in `directory` (certificates, data, kubeconfigs, logs). The
    processes are in `LabState.processes` with roles `etcd`, `kube-apiserver` and `mirror`."""

    directory: str
    url: str
    apiserver_port: int
    etcd_client_port: int
    etcd_peer_port: int
    probe_pod_namespaces: list[str] = field(default_factory=list)
    """Where the lab's collector may create probe pods (the probe-pods Role is bound there)."""
    expectations_configmaps: bool = False
    """The lab's collector also reads ConfigMap expectations (with the overlay's ClusterRole)."""

    @property
    def admin_kubeconfig(self) -> str:
        return str(Path(self.directory) / "admin.kubeconfig")

    @property
    def collector_kubeconfig(self) -> str:
        return str(Path(self.directory) / "collector.kubeconfig")


@dataclass
class PendingApply:
    """Rulesets computed at a change, to be enforced at `due` (the lag fault)."""

    due: float  # time.time()
    generation: int
    rulesets: dict[str, str]


@dataclass
class LabState:
    """Everything `lab` commands share; serialised to state.json."""

    settings: LabSettings
    phase: str = "building"  # building -> up; "down" while tearing down
    cgroup_root: str = ""
    routes: list[RouteRecord] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[PodRecord] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    generation: int = 0
    enforced_generation: int = 0
    desired: dict[str, str] = field(default_factory=dict)  # pod key -> digest of its ruleset
    applied: dict[str, str] = field(default_factory=dict)  # what the kernel has, by digest
    pending: list[PendingApply] = field(default_factory=list)
    next_index: int = 1
    applier: ProcessRecord | None = None
    loop: LoopRecord | None = None
    apiserver: ApiServerRecord | None = None

    def pod(self, key: str) -> PodRecord | None:
        for pod in self.pods:
            if pod.key == key:
                return pod
        return None

    def to_json(self) -> str:
        data = _plain(self)
        assert isinstance(data, dict)
        data["settings"] = self.settings.to_dict()
        data["version"] = STATE_VERSION
        # Compact: the C encoder (no indent) keeps a save of a 100-pod lab at a few ms.
        return json.dumps(data, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        version = data.pop("version", None)
        if version != STATE_VERSION:
            raise LabError(f"state format {version!r} is not {STATE_VERSION}: remove it by hand")
        applier = data.get("applier")
        loop = data.get("loop")
        apiserver = data.get("apiserver")
        return cls(
            settings=LabSettings.from_dict(data["settings"]),
            phase=data.get("phase", "building"),
            cgroup_root=data.get("cgroup_root", ""),
            routes=[RouteRecord(**r) for r in data.get("routes", [])],
            netns=list(data.get("netns", [])),
            cgroups=list(data.get("cgroups", [])),
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            namespaces={k: dict(v) for k, v in data.get("namespaces", {}).items()},
            pods=[PodRecord.from_dict(p) for p in data.get("pods", [])],
            policies=list(data.get("policies", [])),
            expectations=list(data.get("expectations", [])),
            faults=Faults(**data.get("faults", {})),
            generation=int(data.get("generation", 0)),
            enforced_generation=int(data.get("enforced_generation", 0)),
            desired=dict(data.get("desired", {})),
            applied=dict(data.get("applied", {})),
            pending=[PendingApply(**p) for p in data.get("pending", [])],
            next_index=int(data.get("next_index", 1)),
            applier=ProcessRecord(**applier) if applier else None,
            loop=LoopRecord(**loop) if loop else None,
            apiserver=ApiServerRecord(**apiserver) if apiserver else None,
        )


def _plain(value: Any) -> Any:
    """JSON-ready copy of dataclasses, dicts, lists and tuples (dataclasses.asdict, faster)."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class LabPaths:
    """Where a lab keeps its files."""

    state_dir: Path
    name: str

    @property
    def root(self) -> Path:
        return self.state_dir / self.name

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / f".{self.name}.lock"

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def cluster_file(self) -> Path:
        return self.cluster_dir / "cluster.yaml"

    @property
    def dns_records(self) -> Path:
        return self.root / "dns.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def nft_dir(self) -> Path:
        return self.root / "nft"

    @property
    def token_file(self) -> Path:
        """The loop's shared token (mode 0600): agents and the collector read it from here."""
        return self.root / "token"

    @property
    def tls_dir(self) -> Path:
        """The loop's CA certificate and the collector's certificate and key."""
        return self.root / "tls"

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> LabState:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError as exc:
            raise NoSuchLabError(
                f"no lab named {self.name!r} in {self.state_dir} (start one with `lab up`)"
            ) from exc
        return LabState.from_json(text)

    def save(self, state: LabState) -> None:
        write_atomically(self.state_file, state.to_json())

    @contextlib.contextmanager
    def locked(self, *, blocking: bool = True) -> Iterator[None]:
        """Hold the lab's exclusive lock (commands, the supervisor and `down` take turns).

        With `blocking=False` raises BlockingIOError at once when someone else holds it.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)


def collector_token_file(name: str, state_dir: str | os.PathLike[str]) -> str | None:
    """The token file of a lab's loop (its collector's token), or None without one. Reads only."""
    try:
        state = LabPaths(Path(state_dir), name).load()
    except (LabError, ValueError, OSError):
        return None
    return state.loop.token_file if state.loop is not None else None


def collector_url(name: str, state_dir: str | os.PathLike[str]) -> str | None:
    """`http://127.0.0.1:<port>` of the collector of a running lab, or None.

    None when there is no such lab, it has no loop, or its collector process is not running.
    (`flowproof verify` calls this to find the lab's collector without flags.) Reads only.
    """
    paths = LabPaths(Path(state_dir), name)
    try:
        state = paths.load()
    except (LabError, ValueError, OSError):
        return None
    if state.loop is None or state.phase != "up":
        return None
    collector = next((p for p in state.processes if p.role == "collector"), None)
    if collector is None or not is_running(collector):
        return None
    return state.loop.url
