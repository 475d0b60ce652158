"""The collector's settings: one documented frozen dataclass, loaded from flags and environment.

A field `foo_bar` is set by `--foo-bar` or `FLOWPROOF_FOO_BAR` (the flag wins); the token comes
only from `FLOWPROOF_TOKEN` or a file (`--token-file`, `FLOWPROOF_TOKEN_FILE`). `load_settings`
validates everything at start; the runtime logs the result once. This module starts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from collector.core.settings import PlannerSettings
from flowproof import settings as loader
from flowproof.errors import ConfigurationError
from flowproof.output import examples

ENV_PREFIX = "FLOWPROOF_"
SOURCES = ("kubernetes", "manifests")
PROBE_POD_MODES = ("off", "lab", "kubernetes")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
JITTER = 1.2
"""A standby waits between one and this many retry periods between tries (as client-go)."""


@dataclass(frozen=True)
class CollectorSettings:
    source: str = "kubernetes"
    """Where the cluster comes from: `kubernetes` (list/watch the API) or `manifests` (files)."""
    manifests: tuple[str, ...] = ()
    """Manifest files or directories for `--source manifests` (comma-separated in the env)."""
    kubeconfig: str = ""
    """Kubeconfig path; empty: $KUBECONFIG, then in-cluster config, then ~/.kube/config."""
    listen_address: str = "0.0.0.0"
    """Address both servers bind to."""
    grpc_port: int = 9443
    """Port of the agents' gRPC stream and the gRPC health service (0 picks a free one)."""
    http_port: int = 8080
    """Port of /metrics, /healthz, /readyz, the web view and /api/v1 (0 picks a free one)."""
    token: str = field(default="", repr=False)
    """Shared secret agents must present (`authorization: Bearer ...`)."""
    tls_cert_file: str = ""
    """PEM certificate chain the gRPC port serves; agents check it against their CA before they
    send the token (required: a Secret or cert-manager in a cluster, the lab's own CA in a lab)."""
    tls_key_file: str = ""
    """The private key of `tls_cert_file` (PEM)."""
    state_dir: str = ""
    """A directory kept across restarts of the collector (an emptyDir in a cluster): the ledger of
    delivered results (a result re-sent after a restart is not counted twice) and the key that
    seals assignments (so results of assignments issued before a restart can be verified).
    Empty: both live in memory, and such results are refused after a restart."""
    verify_token: str = field(default="", repr=False)
    """Bearer token `POST /api/v1/verify` requires (FLOWPROOF_VERIFY_TOKEN or
    --verify-token-file); empty: the agents' token. Nothing else on the HTTP port makes probes."""
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    """How the loop plans, schedules and judges probes; each of its fields is a flag of its own
    (`--interval-seconds`, `--freshness-seconds`, ...)."""
    probe_pods: str = "off"
    """Who creates probe pods for flows whose `from` matches no running pod: `off`, `lab`, or
    `kubernetes` (the collector, through the API, in `probe_pod_namespaces` only)."""
    probe_pod_namespaces: tuple[str, ...] = ()
    """With `--probe-pods kubernetes`: the only namespaces probe pods may be created in
    (comma-separated in the env); a flow that needs one elsewhere stays INCONCLUSIVE."""
    probe_pod_image: str = "registry.k8s.io/pause:3.10"
    """With `--probe-pods kubernetes`: the image of a probe pod's one container (it only has to
    keep running; the agent probes from the pod's network namespace)."""
    lab_name: str = "fp"
    """With `--probe-pods lab`: the lab to create them in."""
    lab_state_dir: str = "/var/lib/flowproof/lab"
    """With `--probe-pods lab`: the lab's state directory."""
    expectations_configmaps: bool = False
    """With `--source kubernetes`: also read expectations from ConfigMaps labelled
    `flowproof.dev/expectations=true` in every namespace (needs list/watch on ConfigMaps)."""
    policy_reports: bool = False
    """With `--source kubernetes`: write a PolicyReport (wgpolicyk8s.io/v1alpha2) per namespace
    with one result per NetworkPolicy (its evidence), for Policy Reporter and Kyverno's UIs;
    needs the PolicyReport CRD and deploy/overlays/policy-reports' RBAC."""
    status_interval_seconds: float = 15.0
    """With `--source kubernetes`: write each FlowExpectations' status this often (and soon after
    a status changes), only when it changed; 0 writes none."""
    leader_election: bool = False
    """With `--source kubernetes`: run as one of several replicas. Only the holder of the Lease
    `lease_name` plans, takes agents' streams and writes statuses, reports and probe pods; the
    others watch the cluster, stay ready and refuse agents' streams (UNAVAILABLE) until they
    lead. A leader that cannot renew within `lease_renew_deadline_seconds` exits (1)."""
    leader_election_namespace: str = ""
    """The Lease's namespace; empty: the pod's own (its service account's namespace file)."""
    leader_election_identity: str = ""
    """This replica's name in the Lease (`holderIdentity`); empty: the host name (the pod's)."""
    lease_name: str = "flowproof-collector"
    """The coordination.k8s.io/v1 Lease the replicas compete for."""
    lease_duration_seconds: float = 15.0
    """How long a standby waits after it last saw the Lease renewed before it takes it over."""
    lease_renew_deadline_seconds: float = 10.0
    """How long the leader keeps trying to renew before it gives up leading (and exits)."""
    lease_retry_period_seconds: float = 2.0
    """How often the leader renews and a standby tries to acquire."""
    state_refresh_seconds: float = 1.0
    """How often staleness is re-evaluated and feedback-latency samples are collected."""
    shutdown_grace_seconds: float = 5.0
    """On SIGTERM: how long to let streams and HTTP requests finish."""
    log_level: str = "INFO"
    """Python logging level name."""

    def validate(self) -> None:
        """Raise ConfigurationError naming the setting that cannot work, and why."""
        problems = []
        if self.source not in SOURCES:
            problems.append(f"source: {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source == "manifests" and not self.manifests:
            problems.append("manifests: --source manifests needs at least one path")
        if "-" in self.manifests:
            problems.append(
                "manifests: `-` (standard input) cannot be watched for changes; give files"
            )
        if self.probe_pods not in PROBE_POD_MODES:
            problems.append(
                f"probe_pods: {self.probe_pods!r} is not one of {', '.join(PROBE_POD_MODES)}"
            )
        if self.probe_pods == "kubernetes":
            if self.source != "kubernetes":
                problems.append("probe_pods: `kubernetes` needs --source kubernetes")
            if not self.probe_pod_namespaces:
                problems.append(
                    "probe_pod_namespaces: --probe-pods kubernetes needs at least one namespace"
                )
            if not self.probe_pod_image.strip() or any(c.isspace() for c in self.probe_pod_image):
                problems.append(f"probe_pod_image: {self.probe_pod_image!r} is not an image name")
        for namespace in self.probe_pod_namespaces:
            if not _DNS_LABEL.fullmatch(namespace):
                problems.append(f"probe_pod_namespaces: {namespace!r} is not a namespace name")
        if self.policy_reports and self.source != "kubernetes":
            problems.append("policy_reports: needs --source kubernetes")
        if self.status_interval_seconds < 0:
            problems.append("status_interval_seconds: must be 0 (no status) or more")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name}: {getattr(self, name)} is outside 0-65535")
        if not self.token:
            problems.append("token: required (FLOWPROOF_TOKEN or --token-file)")
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if not path:
                problems.append(f"{name}: required (agents authenticate the collector by it)")
            elif not os.access(path, os.R_OK):
                problems.append(f"{name}: {path!r} cannot be read")
        if self.leader_election:
            problems.extend(self._leader_election_problems())
        if self.state_refresh_seconds <= 0:
            problems.append("state_refresh_seconds: must be positive")
        if problems:
            raise ConfigurationError("; ".join(problems))

    def _leader_election_problems(self) -> list[str]:
        problems = []
        if self.source != "kubernetes":
            problems.append("leader_election: needs --source kubernetes")
        if not _DNS_SUBDOMAIN.fullmatch(self.lease_name):
            problems.append(f"lease_name: {self.lease_name!r} is not an object name")
        if self.leader_election_namespace and not _DNS_LABEL.fullmatch(
            self.leader_election_namespace
        ):
            problems.append(
                f"leader_election_namespace: {self.leader_election_namespace!r} "
                "is not a namespace name"
            )
        identity = self.leader_election_identity
        if identity and (len(identity) > 253 or not identity.isprintable() or " " in identity):
            problems.append(f"leader_election_identity: {identity!r} is not a usable identity")
        duration = self.lease_duration_seconds
        deadline = self.lease_renew_deadline_seconds
        retry = self.lease_retry_period_seconds
        if retry <= 0:
            problems.append("lease_retry_period_seconds: must be positive")
        elif deadline <= retry * JITTER:
            problems.append(
                f"lease_renew_deadline_seconds: {deadline:g} must exceed "
                f"{JITTER:g} × lease_retry_period_seconds ({retry * JITTER:g})"
            )
        if duration <= deadline:
            problems.append(
                f"lease_duration_seconds: {duration:g} must exceed "
                f"lease_renew_deadline_seconds ({deadline:g})"
            )
        if duration != int(duration) or duration < 1:
            problems.append(
                "lease_duration_seconds: whole seconds, at least 1 (the Lease stores an integer)"
            )
        return problems

    def describe(self) -> str:
        return loader.describe(self, secrets=("token", "verify_token"))

    @property
    def verify_tokens(self) -> tuple[str, ...]:
        """The bearer tokens `POST /api/v1/verify` accepts."""
        return (self.verify_token or self.token,)


def build_parser() -> argparse.ArgumentParser:
    """Every setting as a flag, with its help and Examples (what `--help` prints)."""
    return loader.build_parser(
        CollectorSettings,
        prog="flowproof collector",
        description="The flowproof collector: inventory, engine, planner, agents' streams.",
        secrets=("token", "verify_token"),
        epilog=examples(
        ("in a cluster, as the Deployment runs it (python -m collector in the image)",
         "flowproof collector --source kubernetes --token-file /var/run/secrets/flowproof/token"),
        ("offline, from manifest files that it re-reads when they change",
         "FLOWPROOF_TOKEN=s3cret flowproof collector --source manifests --manifests examples/shop"),
        ("probe pods in two namespaces",
         "flowproof collector --probe-pods kubernetes --probe-pod-namespaces shop,batch"),
        ),
    )  # fmt: skip


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> CollectorSettings:
    """Settings from flags, then environment, then defaults; validated."""
    try:
        settings = loader.load(
            CollectorSettings,
            argv,
            environ,
            parser=build_parser(),
            env_prefix=ENV_PREFIX,
            secrets={"token": "FLOWPROOF_TOKEN", "verify_token": "FLOWPROOF_VERIFY_TOKEN"},
        )
    except loader.SettingsError as exc:
        raise ConfigurationError(str(exc)) from exc
    settings.validate()
    return settings
