"""A real Kubernetes control plane for tests: etcd and kube-apiserver on loopback.

`ControlPlane` starts the binaries that scripts/build-controlplane.sh builds (the upstream
kube-apiserver and etcd, from Go modules) in a fresh work directory of its own, with real
authentication (a static token file and ServiceAccount tokens), real authorization (Node,RBAC)
and real admission (the default plugins plus ValidatingAdmissionPolicy)::

    with ControlPlane(bin_dir) as cp:
        cp.url, cp.ca_path, cp.admin_token, cp.kubeconfig_path
        token = cp.service_account_token("default", "reader")
        cp.compact_etcd()

Everything listens on 127.0.0.1 only, on free ports picked at start. The service range
10.96.0.0/16 is only a range of numbers to the API server: nothing routes it, and no controller,
scheduler or kubelet runs, so Pods stay Pending, Namespaces stay Terminating once deleted, and no
Endpoints or "default" ServiceAccounts are made (the ServiceAccount admission plugin wants the
"default" ServiceAccount of a namespace to exist before a Pod is created there).

The watch cache is on, as in a real cluster: watches of cached resources are served from the API
server's own history, which an etcd compaction made from outside does not touch. A resource whose
watches must go to etcd (and so get 410 Gone after `compact_etcd()`) is named in
`uncached_resources` (`--watch-cache-sizes=RESOURCE#0`).

Only the standard library, cryptography and lab.certs (the lab's one certificate authority):
nothing else of the project is imported.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lab.certs import issue

__all__ = [
    "SERVICE_CLUSTER_IP_RANGE",
    "ApiResponse",
    "ControlPlane",
    "ControlPlaneError",
    "Launcher",
    "RunningProcess",
]

LOOPBACK = "127.0.0.1"
# Every request once, when its answer is ready (and for watches when they start), without bodies.
_AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"  # never routed anywhere: only numbers to the API server
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "flowproof-admin"
_LOG_TAIL_BYTES = 6000
_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The control plane could not be started, or a call to it failed."""


BIN_ENV = "FLOWPROOF_CONTROLPLANE_BIN"
"""A directory holding prebuilt kube-apiserver and etcd (scripts/test.sh sets it after its build)."""
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build-controlplane.sh"
BUILD_TIMEOUT_SECONDS = 3000.0  # a first build from an empty Go cache takes minutes on two cores


def binaries(
    explicit: Path | str | None = None, *, environ: Mapping[str, str] | None = None
) -> Path:
    """The directory holding kube-apiserver and etcd: `explicit`, else $FLOWPROOF_CONTROLPLANE_BIN,
    else what scripts/build-controlplane.sh builds (or finds in its cache; the first build takes
    minutes). ControlPlaneError, with the end of the build's log, when there are none."""
    env = os.environ if environ is None else environ
    given = explicit or env.get(BIN_ENV)
    if given:
        found = Path(given)
    else:
        if not BUILD_SCRIPT.exists():
            raise ControlPlaneError(f"no {BUILD_SCRIPT}: the control plane is built from the repo")
        with tempfile.TemporaryFile() as log:
            try:
                proc = subprocess.run(
                    ["bash", str(BUILD_SCRIPT)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    timeout=BUILD_TIMEOUT_SECONDS,
                    check=False,
                )
                failed = f"failed (exit {proc.returncode})" if proc.returncode else ""
            except subprocess.TimeoutExpired:
                proc, failed = None, f"did not finish in {BUILD_TIMEOUT_SECONDS:.0f} s"
            log.seek(0)
            errors = log.read().decode(errors="replace")
        lines = proc.stdout.decode().strip().splitlines() if proc is not None else []
        if failed or not lines:
            raise ControlPlaneError(
                f"{BUILD_SCRIPT} {failed or 'printed no directory'}:\n{errors[-4000:]}"
            )
        found = Path(lines[-1])
    for name in ("kube-apiserver", "etcd"):
        if not os.access(found / name, os.X_OK):
            raise ControlPlaneError(f"{found / name} is missing or not executable")
    return found


@dataclass(frozen=True)
class ApiResponse:
    """One HTTP answer of the API server (or etcd): the status and the decoded JSON body."""

    status: int
    body: Any  # the decoded JSON, or the text when the body is not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the test process dies without stop(), the kernel ends the child too (SIGTERM).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class RunningProcess(Protocol):
    """A started etcd or kube-apiserver, as the control plane needs to know it."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def stop(self, timeout: float) -> None:
        """End it (by its pid) and reap it; safe to call when it has exited already."""

    def failure(self, what: str) -> ControlPlaneError:
        """The error saying it `what` (did not start, exited...), with the tail of its log."""


Launcher = Callable[[str, Sequence[str], Path, Path], RunningProcess]
"""Starts one process: (name, argv, log file, working directory) -> the running process. The
default runs it as a child of this process; the lab has its supervisor run it instead."""


def _tail_failure(name: str, what: str, state: str, log_path: Path) -> ControlPlaneError:
    return ControlPlaneError(
        f"{name} {what} ({state}); last lines of {log_path}:\n{_tail(log_path)}"
    )


class _Process:
    """One child process, its log file and its pid."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, cwd: Path, die_with_parent: bool
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float) -> None:
        """SIGTERM to the recorded pid, SIGKILL after `timeout` seconds, then reap it."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.send_signal(signal.SIGKILL)
                    self.popen.wait(timeout)
        finally:
            self._log.close()

    def failure(self, what: str) -> ControlPlaneError:
        code = self.popen.poll()
        state = "still running" if code is None else f"exited with code {code}"
        return _tail_failure(self.name, what, state, self.log_path)


class ControlPlane:
    """etcd and kube-apiserver on free loopback ports, in a work directory of their own.

    `bin_dir` holds `kube-apiserver` and `etcd` (scripts/build-controlplane.sh prints it).
    `start()` (or entering the context) returns when /readyz answers ok; `stop()` (or leaving the
    context) ends both processes by their pids and removes the work directory. `stop()` is safe to
    call at any time, also after a start that failed halfway, and more than once.

    With `die_with_parent` (the default) the kernel sends the processes SIGTERM when the thread
    that started them ends (PR_SET_PDEATHSIG), so a test process that dies without stop() leaves
    nothing running. Start from a thread that lives as long as the control plane (the main thread,
    not a worker of `asyncio.to_thread`), or pass `die_with_parent=False`.

    For a control plane that outlives the process starting it (the lab's): `workdir` names its
    directory (created, kept on stop), `launcher` starts the processes (the lab's supervisor),
    `pick_ports(count)` chooses the loopback ports. `audit_log` records every request the API
    server answers in `audit.log` (one JSON event per line, `audit_events()`), for tests that
    check what a client asked.
    """

    def __init__(
        self,
        bin_dir: Path | str,
        *,
        ready_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        anonymous_auth: bool = False,
        uncached_resources: Sequence[str] = (),
        extra_apiserver_args: Sequence[str] = (),
        workdir_parent: Path | str | None = None,
        keep_workdir: bool = False,
        die_with_parent: bool = True,
        workdir: Path | str | None = None,
        launcher: Launcher | None = None,
        pick_ports: Callable[[int], Sequence[int]] | None = None,
        audit_log: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.kube_apiserver_bin = self.bin_dir / "kube-apiserver"
        self.etcd_bin = self.bin_dir / "etcd"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.anonymous_auth = anonymous_auth
        self.uncached_resources = tuple(uncached_resources)
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self._workdir_parent = None if workdir_parent is None else Path(workdir_parent)
        self._fixed_workdir = None if workdir is None else Path(workdir)
        self.keep_workdir = keep_workdir or workdir is not None
        self.die_with_parent = die_with_parent
        self._launcher = launcher
        self._pick = pick_ports
        self.audit_log = audit_log

        self.admin_token = secrets.token_urlsafe(32)
        self._workdir: Path | None = None
        self._etcd: RunningProcess | None = None
        self._apiserver: RunningProcess | None = None
        self._apiserver_argv: list[str] = []
        self._ssl: ssl.SSLContext | None = None
        self.apiserver_port = 0
        self.etcd_client_port = 0
        self.etcd_peer_port = 0
        self.etcd_ready_seconds: float | None = None
        self.time_to_ready: float | None = None  # from start() until /readyz said ok

    # ----- what tests use -----

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("the control plane is not started")
        return self._workdir

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{LOOPBACK}:{self.etcd_client_port}"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def apiserver_log(self) -> Path:
        return self.workdir / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def audit_log_path(self) -> Path:
        return self.workdir / "audit.log"

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """The audit events recorded so far (with `audit_log`), oldest first; only those of
        `user` (a username such as `system:serviceaccount:ns:name`) when given."""
        try:
            lines = self.audit_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line.strip()]
        if user is not None:
            events = [e for e in events if e.get("user", {}).get("username") == user]
        return events

    @property
    def pids(self) -> dict[str, int]:
        """The pids of the processes this control plane started (and has not yet reaped)."""
        return {p.name: p.pid for p in (self._etcd, self._apiserver) if p is not None}

    @property
    def running(self) -> bool:
        return all(p is not None and p.alive() for p in (self._etcd, self._apiserver))

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this control plane's CA."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        return self._ssl

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----- lifecycle -----

    def start(self) -> Self:
        if self._workdir is not None:
            raise ControlPlaneError("the control plane is already started")
        for binary in (self.kube_apiserver_bin, self.etcd_bin):
            if not os.access(binary, os.X_OK):
                raise ControlPlaneError(
                    f"{binary} is missing or not executable: run scripts/build-controlplane.sh"
                )
        began = time.monotonic()
        try:
            if self._fixed_workdir is not None:
                self._fixed_workdir.mkdir(mode=0o700, parents=True, exist_ok=False)
                self._workdir = self._fixed_workdir
            else:
                self._workdir = Path(
                    tempfile.mkdtemp(prefix="flowproof-cp-", dir=self._workdir_parent)
                )
            self._write_credentials()
            for attempt in range(3):  # a free port can be taken by someone else before we bind it
                self._pick_ports()
                self._start_etcd()
                if self._wait_etcd():
                    break
                self._stop_processes()
                if attempt == 2:
                    raise self._etcd_failure()
            self.etcd_ready_seconds = time.monotonic() - began
            for attempt in range(3):
                self._start_apiserver()
                if self._wait_ready(began):
                    break
                self._stop_apiserver()
                if attempt == 2:
                    raise self._apiserver_failure()
                self.apiserver_port = self._ports(1)[0]
            self.time_to_ready = time.monotonic() - began
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (every open connection and watch drops) and start it again on
        the same port against the same etcd; returns once /readyz says ok again."""
        began = time.monotonic()
        self._stop_apiserver()
        for attempt in range(3):
            self._start_apiserver()
            if self._wait_ready(began):
                return
            self._stop_apiserver()
            if attempt == 2:
                raise self._apiserver_failure()

    def stop(self) -> None:
        """End both processes by their recorded pids and remove the work directory."""
        try:
            self._stop_processes()
        finally:
            workdir, self._workdir, self._ssl = self._workdir, None, None
            if workdir is not None and not self.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        try:
            self._stop_apiserver()
        finally:
            etcd, self._etcd = self._etcd, None
            if etcd is not None:
                etcd.stop(self.stop_timeout)

    def _stop_apiserver(self) -> None:
        apiserver, self._apiserver = self._apiserver, None
        if apiserver is not None:
            apiserver.stop(self.stop_timeout)

    def _ports(self, count: int) -> list[int]:
        if self._pick is not None:
            return list(self._pick(count))
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(_free_port())
        return sorted(ports)

    def _pick_ports(self) -> None:
        self.etcd_client_port, self.etcd_peer_port, self.apiserver_port = self._ports(3)

    # ----- credentials and configuration -----

    def _write_credentials(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(mode=0o700)
        issued = issue([LOOPBACK, "localhost"], common_name="kube-apiserver")
        (pki / "ca.crt").write_bytes(issued.ca)
        (pki / "apiserver.key").write_bytes(issued.key)
        (pki / "apiserver.crt").write_bytes(issued.certificate)

        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(
            sa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        # token,user,uid,"group1,group2"
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},uid-admin,"system:masters"\n'
        )
        for path in pki.iterdir():
            path.chmod(0o600)

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(self.kubeconfig_path, self.admin_token, ADMIN_USER)

    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        """A kubeconfig (mode 0600) for this API server that authenticates with `token`."""
        config = {  # JSON is YAML: kubectl and the kubernetes client read it as it is
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "flowproof-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "flowproof-test",
                    "context": {"cluster": "flowproof-test", "user": user},
                }
            ],
            "current-context": "flowproof-test",
            "preferences": {},
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(config, indent=2) + "\n")
        return path

    def _etcd_argv(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.etcd_client_port}"
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        return [
            str(self.etcd_bin),
            "--name=flowproof-test",
            f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=flowproof-test={peer}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=flowproof-{secrets.token_hex(4)}",
            "--enable-grpc-gateway=true",  # the HTTP/JSON API compact_etcd() uses
            "--unsafe-no-fsync",  # a throwaway store: fsync only slows tests down
            "--log-level=warn",
        ]

    def _apiserver_argv_for(self) -> list[str]:
        pki = self.workdir / "pki"
        argv = [
            str(self.kube_apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--anonymous-auth={'true' if self.anonymous_auth else 'false'}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",  # as kubeadm runs it: admission decides, not this flag
            "--enable-admission-plugins=ValidatingAdmissionPolicy",  # added to the defaults
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # A loopback advertise address is not a valid Endpoints address: reconcile nothing.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]
        if self.uncached_resources:
            argv.append(
                "--watch-cache-sizes=" + ",".join(f"{r}#0" for r in self.uncached_resources)
            )
        if self.audit_log:
            policy = self.workdir / "audit-policy.json"
            policy.write_text(json.dumps(_AUDIT_POLICY))
            argv += [
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",  # an event is in the file before the answer leaves
            ]
        argv.extend(self.extra_apiserver_args)
        return argv

    # ----- starting and waiting -----

    def _launch(self, name: str, argv: Sequence[str], log_path: Path) -> RunningProcess:
        if self._launcher is not None:
            return self._launcher(name, argv, log_path, self.workdir)
        return _Process(name, argv, log_path, self.workdir, self.die_with_parent)

    def _start_etcd(self) -> None:
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)  # from a failed attempt
        self._etcd = self._launch("etcd", self._etcd_argv(), self.etcd_log)

    def _start_apiserver(self) -> None:
        self._apiserver_argv = self._apiserver_argv_for()
        self._apiserver = self._launch("kube-apiserver", self._apiserver_argv, self.apiserver_log)

    def _etcd_failure(self) -> ControlPlaneError:
        return ControlPlaneError(
            f"etcd did not become healthy on {self.etcd_url}; last lines of {self.etcd_log}:\n"
            f"{_tail(self.etcd_log)}"
        )

    def _apiserver_failure(self) -> ControlPlaneError:
        return ControlPlaneError(
            f"kube-apiserver did not become ready on {self.url}/readyz within "
            f"{self.ready_timeout:.0f} s; last lines of {self.apiserver_log}:\n"
            f"{_tail(self.apiserver_log)}"
        )

    def _wait_etcd(self) -> bool:
        """True once etcd is healthy; False if it died of a port taken meanwhile."""
        etcd = self._etcd
        assert etcd is not None
        deadline = time.monotonic() + min(self.ready_timeout, 60.0)
        while time.monotonic() < deadline:
            if not etcd.alive():
                if "address already in use" in _tail(self.etcd_log):
                    return False
                raise etcd.failure("exited before it was healthy")
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp,
            ):
                if json.loads(resp.read()).get("health") == "true":
                    return True
            time.sleep(0.1)
        raise etcd.failure(f"was not healthy within {min(self.ready_timeout, 60.0):.0f} s")

    def _wait_ready(self, began: float) -> bool:
        """True once /readyz says ok; False if the API server died of a port taken meanwhile."""
        apiserver = self._apiserver
        assert apiserver is not None
        deadline = began + self.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if not apiserver.alive():
                if "address already in use" in _tail(self.apiserver_log):
                    return False
                raise apiserver.failure("exited before it was ready")
            try:
                resp = self.request("GET", "/readyz", timeout=5)
                if resp.status == 200 and str(resp.body).strip() == "ok":
                    return True
                last = f"/readyz {resp.status}: {str(resp.body)[-400:]}"
            except (OSError, http.client.HTTPException) as e:
                last = f"/readyz: {e}"
            time.sleep(0.2)
        raise ControlPlaneError(
            f"kube-apiserver was not ready within {self.ready_timeout:.0f} s (last: {last}); "
            f"last lines of {self.apiserver_log}:\n{_tail(self.apiserver_log)}"
        )

    # ----- talking to the API server -----

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        anonymous: bool = False,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> ApiResponse:
        """One request to the API server; an error status is returned, not raised.

        The admin token is sent unless `token` names another or `anonymous` is set.
        """
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if not anonymous:
            headers["Authorization"] = f"Bearer {token or self.admin_token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as resp:
                return ApiResponse(resp.status, _decode(resp.read()))
        except urllib.error.HTTPError as e:
            with e:
                return ApiResponse(e.code, _decode(e.read()))

    def _ok(self, resp: ApiResponse, what: str) -> Any:
        if not resp.ok:
            raise ControlPlaneError(f"{what}: HTTP {resp.status}: {resp.body}")
        return resp.body

    def create_namespace(self, name: str, *, exist_ok: bool = True) -> None:
        resp = self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        if not (exist_ok and resp.status == 409):
            self._ok(resp, f"create namespace {name}")

    def create_service_account(self, namespace: str, name: str, *, exist_ok: bool = True) -> None:
        resp = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )
        if not (exist_ok and resp.status == 409):
            self._ok(resp, f"create serviceaccount {namespace}/{name}")

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        create: bool = True,
        expiration_seconds: int = 3600,
        audiences: Sequence[str] = (),
    ) -> str:
        """A token for ServiceAccount namespace/name from the TokenRequest API.

        With `create`, the namespace and the ServiceAccount are made first when missing.
        """
        if create:
            self.create_namespace(namespace)
            self.create_service_account(namespace, name)
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        body = self._ok(
            self.request(
                "POST",
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            ),
            f"token for serviceaccount {namespace}/{name}",
        )
        token: str = body["status"]["token"]
        return token

    # ----- etcd -----

    def _etcd_call(self, path: str, body: Mapping[str, Any], timeout: float = 30.0) -> Any:
        req = urllib.request.Request(
            self.etcd_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            with e:
                raise ControlPlaneError(f"etcd {path}: HTTP {e.code}: {e.read()[:400]!r}") from e

    def etcd_revision(self) -> int:
        """etcd's current revision (the newest resourceVersion the API server can have seen)."""
        status = self._etcd_call("/v3/maintenance/status", {})
        return int(status["header"]["revision"])

    def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd's history up to `revision` (default: the current one); returns it.

        Afterwards a watch or a list at an older resourceVersion that reaches etcd gets 410 Gone.
        Watches of cached resources are served by the API server's watch cache, which does not see
        this compaction: name the resource in `uncached_resources` to send its watches to etcd.
        """
        rev = self.etcd_revision() if revision is None else revision
        self._etcd_call("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def etcd_keys(self, prefix: str = "/registry/") -> Iterator[str]:
        """The keys etcd holds under `prefix` (for checks that something reached storage)."""
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        resp = self._etcd_call(
            "/v3/kv/range",
            {
                "key": base64.b64encode(start).decode(),
                "range_end": base64.b64encode(end).decode(),
                "keys_only": True,
            },
        )
        for kv in resp.get("kvs", []):
            yield base64.b64decode(kv["key"]).decode(errors="replace")
