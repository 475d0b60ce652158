"""Evidence per policy: witness flows whose model verdict depends on each policy and each rule.

A *witness* of a NetworkPolicy (or of one rule in it) is a probeable flow whose verdict flips when
that policy (rule) is removed from the policy set: an isolation witness is denied only because
the policy isolates the pod, an allow witness is allowed only because of the rule. Probing the
witnesses proves the policy is enforced as written; one that contradicts the model shows it is
not (DESIGN.md, "Evidence per policy").

Owns `plan_evidence` (snapshot -> EvidencePlan: for every policy its witnesses, or in words why
none can exist) and `evidence_of` (the status of every policy and rule from its witnesses' flow
statuses). It computes over the engine's equivalence classes (collector.core.classes): per port,
the number of rules allowing each class pair and of policies isolating each class, so removing a
policy or a rule is a subtraction on the rows it touches, and the cost is bounded by classes and
policies, not pods. Pure: no I/O.

Decisions:
- Ports: a rule's numbered ports; for an `endPort` range a port inside it other than its first
  (an enforcer that ignores endPort is caught); for a named port the number it resolves to on the
  destination (one that ignores names is caught); for `ports` absent, and for isolation, a port the
  destination declares, else 80/TCP (answered by a responder).
- Sources and destinations: running pods, real ones before probe pods (which are only sources);
  hostNetwork pods are never selected by a policy and are left out.
- Per rule, witnesses cover each peer and each port entry at least once where they give distinct
  witnesses; per policy, one isolation witness per isolated direction and one removal witness per
  direction when its rules are the only ones allowing a flow.
- No witness: the policy selects no pod; it is redundant (removing it changes no verdict: a lint);
  its effect is only on addresses outside the cluster (then a declared `cidr` destination is used
  when one exists); no running pod can send or receive its witnesses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from collector.core.classes import ClassModel
from collector.core.engine import Endpoint, Engine, endpoint_name
from collector.core.model import (
    Direction,
    ExternalTarget,
    NetworkPolicy,
    Pod,
    PolicyPort,
    Protocol,
    Rule,
    Snapshot,
)
from collector.core.probepods import is_probe_pod
from collector.core.resolving import external_address
from collector.core.statuses import Status

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float32]
EvidenceStatus = Literal["PROVEN", "NOT_ENFORCED", "UNPROVABLE", "PENDING"]
EVIDENCE_STATUSES: tuple[EvidenceStatus, ...] = ("NOT_ENFORCED", "PENDING", "UNPROVABLE", "PROVEN")
"""Worst first."""
WitnessKind = Literal["isolation", "removal", "allow"]
WITNESS_KEY_PREFIX = "witness:"
"""Every witness flow's key starts so."""
PORTS_CACHED = 256
"""Ports whose matrices one plan's evidence keeps at most."""
PORT_CACHE_BYTES = 512 << 20
"""Bytes of port matrices one plan's evidence keeps at most (the newest port is always kept)."""
FULL_COUNT_CELLS = 1 << 20
"""Class pairs up to which a port's rule counts are computed whole once and sliced; above, each
block multiplies only its own rows (or columns) by the rules that touch them."""
FALLBACK_PORT: tuple[int, Protocol] = (80, "TCP")
"""The port of an isolation witness to a pod that declares none (a responder answers it)."""


# --- what a witness is ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleRef:
    """One rule of a policy: `shop/db-ingress ingress[0]`."""

    policy: str
    direction: Direction
    index: int

    @property
    def key(self) -> str:
        return f"{self.policy} {self.direction}[{self.index}]"


@dataclass(frozen=True)
class Witness:
    """A flow whose verdict flips when `policy` (or `rule`) is removed.

    `model` is the verdict as the policies stand; the witness contradicts the model when the network
    does the opposite. `why` says in words what it proves; `via` how its port was chosen.
    """

    policy: str
    rule: RuleRef | None
    kind: WitnessKind
    direction: Direction
    source: Pod
    destination: Endpoint
    port: int
    protocol: Protocol
    model: bool
    why: str
    via: str = ""

    @property
    def flow_key(self) -> str:
        """The key of the concrete flow that probes it (shared by witnesses of the same flow)."""
        return (
            f"{WITNESS_KEY_PREFIX}{self.source.key}->{endpoint_name(self.destination)}:"
            f"{self.port}/{self.protocol}"
        )

    @property
    def subject(self) -> str:
        return self.rule.key if self.rule is not None else self.policy

    def describe(self) -> str:
        word = "allowed" if self.model else "denied"
        flow = f"{self.source.key} -> {endpoint_name(self.destination)} {self.port}/{self.protocol}"
        via = f" ({self.via})" if self.via else ""
        return f"{flow}{via} must be {word}: {self.why}"


@dataclass(frozen=True)
class RuleEvidencePlan:
    rule: RuleRef
    text: str  # the rule in words: "from podSelector app=api; ports 5432/TCP"
    witnesses: tuple[Witness, ...]
    unprovable: str = ""


@dataclass(frozen=True)
class PolicyEvidencePlan:
    """One policy: its own witnesses (isolation, removal), its rules', or why none can exist."""

    policy: str
    namespace: str
    name: str
    source: str
    witnesses: tuple[Witness, ...]
    rules: tuple[RuleEvidencePlan, ...]
    unprovable: str = ""
    lint: tuple[str, ...] = ()

    def all_witnesses(self) -> tuple[Witness, ...]:
        return self.witnesses + tuple(w for r in self.rules for w in r.witnesses)


@dataclass(frozen=True)
class EvidencePlan:
    policies: tuple[PolicyEvidencePlan, ...] = ()
    pending: str = ""
    """Why the witnesses are not chosen yet (a plan updated for changed policies, before its
    whole plan): then every policy is PENDING, for this reason."""

    def witnesses(self) -> list[Witness]:
        return [w for p in self.policies for w in p.all_witnesses()]

    def by_flow(self) -> dict[str, list[Witness]]:
        """Witnesses grouped by the concrete flow that probes them."""
        out: dict[str, list[Witness]] = {}
        for w in self.witnesses():
            out.setdefault(w.flow_key, []).append(w)
        return out

    def policy(self, key: str) -> PolicyEvidencePlan | None:
        return next((p for p in self.policies if p.policy == key), None)


# --- the class matrices ---------------------------------------------------------------------------


class _Counts:
    """counts[a, b] = sum over rules r of left[a, r] * right[r, b], computed on first use (a port
    that no block needs costs nothing but its rule columns).

    While the table is small (`FULL_COUNT_CELLS`) it is computed whole once and sliced. Above, a
    block is computed from its own rows (or columns) and only the rules that touch them: a
    policy's block is the few classes it selects against every class, never classes².
    """

    def __init__(self, left: FloatArray, right: FloatArray) -> None:
        self.left = left
        self.right = right
        self._values: FloatArray | None = None

    @property
    def nbytes(self) -> int:
        held = self._values.nbytes if self._values is not None else 0
        return int(self.left.nbytes + self.right.nbytes + held)

    def block(self, rows: IntArray, cols: IntArray, *, whole_rows: bool) -> FloatArray:
        """values[rows][:, cols]; `whole_rows` when `cols` is every class (else `rows` is)."""
        if self._values is None and self.left.shape[0] * self.right.shape[1] <= FULL_COUNT_CELLS:
            self._values = self.left @ self.right
        if self._values is not None:
            values = self._values
            return values[rows, :] if whole_rows else values[:, cols]
        if whole_rows:
            left = self.left[rows]
            used = np.flatnonzero(left.any(axis=0))
            return np.asarray(left[:, used] @ self.right[used], dtype=np.float32)
        right = self.right[:, cols]
        used = np.flatnonzero(right.any(axis=1))
        return np.asarray(self.left[:, used] @ right[used], dtype=np.float32)


@dataclass
class _PortMatrices:
    """For one port: rule and isolation counts per class pair; verdicts computed per block."""

    # Rule columns are only the rules that can admit the port (the others count nothing):
    # `local_in[j]` / `local_eg[j]` is rule row j's column, or -1.
    s_in: FloatArray  # [class d, ingress rule] the rule's policy selects d and admits the port on d
    p_in: FloatArray  # [ingress rule, class s] a peer of the rule matches s
    s_eg: FloatArray  # [class s, egress rule] the rule's policy selects s
    p_eg: FloatArray  # [egress rule, class d] a peer matches d and the rule admits the port on d
    cnt_in: _Counts  # [d, s] ingress rules allowing s -> d
    cnt_eg: _Counts  # [s, d] egress rules allowing s -> d
    iso_in: FloatArray  # [d] policies isolating d for ingress
    iso_eg: FloatArray  # [s] policies isolating s for egress
    declares: BoolArray  # [d] the class declares this port
    local_in: IntArray
    local_eg: IntArray

    @property
    def nbytes(self) -> int:
        return int(
            self.s_in.nbytes
            + self.p_in.nbytes
            + self.s_eg.nbytes
            + self.p_eg.nbytes
            + self.cnt_in.nbytes
            + self.cnt_eg.nbytes
        )

    def columns(self, direction: Direction, rows: IntArray) -> IntArray:
        """The columns of these rule rows that can admit the port (the others are all zero)."""
        local = (self.local_in if direction == "ingress" else self.local_eg)[rows]
        return np.asarray(local[local >= 0], dtype=np.intp)


def _admits_number(entries: Sequence[PolicyPort], port: int, protocol: Protocol) -> bool:
    """Whether an entry without a named port admits the port."""
    for entry in entries:
        if entry.protocol != protocol or isinstance(entry.port, str):
            continue
        if entry.port is None or entry.port == port:
            return True
        if entry.end_port is not None and entry.port <= port <= entry.end_port:
            return True
    return False


class _RuleEntries:
    """The rules of one direction indexed by the ports their entries can admit, so that a port's
    matrices look only at the rules that may admit it (and at those without `ports`)."""

    def __init__(self, model: ClassModel, rows: Sequence[tuple[int, int, Rule]]) -> None:
        self.every: list[int] = []  # no `ports`: every port
        self.shape_of: dict[int, int] = {}  # rows with a named port entry -> their entries' id
        shapes: dict[tuple[PolicyPort, ...], int] = {}
        self.whole: dict[Protocol, list[int]] = {}  # an entry of the protocol without a port
        spans: dict[Protocol, list[tuple[int, int, int]]] = {}  # (first, last, row)
        named: dict[tuple[Protocol, int], set[int]] = {}  # (protocol, number) -> rows
        for j, (_, _, rule) in enumerate(rows):
            if not rule.ports:
                self.every.append(j)
            for entry in rule.ports:
                if entry.port is None:
                    self.whole.setdefault(entry.protocol, []).append(j)
                elif isinstance(entry.port, str):
                    self.shape_of[j] = shapes.setdefault(tuple(rule.ports), len(shapes))
                    col = model.named.get((entry.port, entry.protocol))
                    if col is None:
                        continue
                    for number in np.unique(model.named_ports[:, col]):
                        if number >= 0:
                            named.setdefault((entry.protocol, int(number)), set()).add(j)
                else:
                    last = entry.end_port if entry.end_port is not None else entry.port
                    spans.setdefault(entry.protocol, []).append((entry.port, last, j))
        self.named = named
        self.spans = {
            protocol: (
                np.array([a for a, _, _ in found], dtype=np.int64),
                np.array([b for _, b, _ in found], dtype=np.int64),
                np.array([j for _, _, j in found], dtype=np.intp),
            )
            for protocol, found in spans.items()
        }

    def candidates(self, port: int, protocol: Protocol) -> list[int]:
        """Rule rows that may admit the port, in order (a superset: `port_ok` decides)."""
        found = set(self.every) | set(self.whole.get(protocol, ()))
        found |= self.named.get((protocol, port), set())
        if protocol in self.spans:
            first, last, rows = self.spans[protocol]
            found.update(int(j) for j in rows[(first <= port) & (port <= last)])
        return sorted(found)


class _Matrices:
    """Rule rows of the class model with their policy and index, and per-port matrices (cached).

    The counts of allowing rules per class pair are computed by rows or columns as blocks need
    them (_Counts): a port a few policies need costs a few rows of the table, not all of it.
    """

    def __init__(
        self, model: ClassModel, declared_ports: Mapping[int, Sequence[tuple[int, Protocol]]]
    ) -> None:
        self.model = model
        self.k = model.classes
        # Caches of this instance only: a cache on the method would be the class's and keep
        # every plan's matrices (and class model) alive after the plan is gone.
        self._peers: dict[tuple[Direction, int], BoolArray] = {}
        self._at: dict[tuple[int, Protocol], _PortMatrices] = {}
        self.rows: dict[Direction, list[tuple[int, int, Rule]]] = {"ingress": [], "egress": []}
        # ClassModel lists the rules of the directions in each policy's policyTypes, in order.
        for pi, policy in enumerate(model.policies):
            for direction in ("ingress", "egress"):
                if direction not in policy.policy_types:
                    continue
                rules = policy.ingress if direction == "ingress" else policy.egress
                for ri, rule in enumerate(rules):
                    self.rows[direction].append((pi, ri, rule))
        self.isolates = {
            d: np.array([d in p.policy_types for p in model.policies], dtype=np.bool_).reshape(
                len(model.policies)
            )
            for d in ("ingress", "egress")
        }
        self.policy_of: dict[Direction, IntArray] = {
            d: np.array([pi for pi, _, _ in self.rows[d]], dtype=np.intp) for d in self.rows
        }
        self._entries = {d: _RuleEntries(model, self.rows[d]) for d in self.rows}
        # The same for every port: policies isolating each class, classes declaring each port.
        self.isolating: dict[Direction, FloatArray] = {
            d: np.asarray(model.selected[:, self.isolates[d]].sum(axis=1), dtype=np.float32)
            for d in ("ingress", "egress")
        }
        self._declaring: dict[tuple[int, Protocol], list[int]] = {}
        for cls, ports in declared_ports.items():
            for pp in ports:
                self._declaring.setdefault(pp, []).append(cls)

    def peers(self, direction: Direction, row: int) -> BoolArray:
        """Per class: does it match a peer of rule `row` of `direction`? (cached)"""
        found = self._peers.get((direction, row))
        if found is None:
            rows = self.model.rules_in if direction == "ingress" else self.model.rules_eg
            cols = rows[row].peers
            if cols is None:
                found = np.ones(self.k, dtype=np.bool_)
            else:
                found = np.asarray(self.model.peer_match[:, list(cols)].any(axis=1), dtype=np.bool_)
            self._peers[(direction, row)] = found
        return found

    def port_ok(self, rule: Rule, port: int, protocol: Protocol) -> BoolArray:
        """Per class as the destination: does some port entry of `rule` admit the port?"""
        if not rule.ports:
            return np.ones(self.k, dtype=np.bool_)
        return np.asarray(self.entries_ok(rule.ports, port, protocol).any(axis=0), dtype=np.bool_)

    def entries_ok(self, entries: Sequence[PolicyPort], port: int, protocol: Protocol) -> BoolArray:
        """[entry, class as destination]: does each port entry admit the port on that class?"""
        out = np.zeros((len(entries), self.k), dtype=np.bool_)
        for i, entry in enumerate(entries):
            if entry.protocol != protocol:
                continue
            if entry.port is None:
                out[i] = True
            elif isinstance(entry.port, str):
                col = self.model.named[(entry.port, protocol)]
                out[i] = self.model.named_ports[:, col] == port
            elif entry.end_port is not None:
                out[i] = entry.port <= port <= entry.end_port
            else:
                out[i] = entry.port == port
        return out

    def at(self, port: int, protocol: Protocol) -> _PortMatrices:
        """The matrices of one port (cached: the last ports asked for, up to PORTS_CACHED of them
        and PORT_CACHE_BYTES; the newest is always kept)."""
        found = self._at.get((port, protocol))
        if found is None:
            found = self._port_matrices(port, protocol)
            # Counts computed whole grow the older entries: measured again as a port is added.
            held = sum(m.nbytes for m in self._at.values()) + found.nbytes
            while self._at and (len(self._at) >= PORTS_CACHED or held > PORT_CACHE_BYTES):
                held -= self._at.pop(next(iter(self._at))).nbytes
            self._at[(port, protocol)] = found
        return found

    def _port_matrices(self, port: int, protocol: Protocol) -> _PortMatrices:
        m = self.model
        out: dict[Direction, tuple[FloatArray, FloatArray, IntArray]] = {}
        for d in ("ingress", "egress"):
            rows = self.rows[d]
            kept: list[int] = []
            admits: list[BoolArray | None] = []
            entries = self._entries[d]
            admitted: dict[int, BoolArray] = {}
            for j in entries.candidates(port, protocol):
                rule = rows[j][2]
                shape = entries.shape_of.get(j)
                if shape is None:
                    # No named port: the rule admits the port on every class or on none.
                    if not rule.ports or _admits_number(rule.ports, port, protocol):
                        kept.append(j)
                        admits.append(None)
                    continue
                ok = admitted.get(shape)  # many rules share their entries: once per port each
                if ok is None:
                    ok = admitted[shape] = self.port_ok(rule, port, protocol)
                if ok.any():
                    kept.append(j)
                    admits.append(ok)
            columns = np.array(kept, dtype=np.intp)
            sel = np.asarray(m.selected[:, self.policy_of[d][columns]], dtype=np.float32)
            sel = sel.reshape(self.k, len(kept))
            peer = np.zeros((len(kept), self.k), dtype=np.float32)
            if kept:
                np.stack([self.peers(d, j) for j in kept], out=peer, casting="unsafe")
            if any(ok is not None for ok in admits):
                ones = np.ones(self.k, dtype=np.bool_)
                ports_ok = np.stack([ones if ok is None else ok for ok in admits])
                if d == "ingress":
                    sel *= ports_ok.T
                else:
                    peer *= ports_ok
            local = np.full(len(rows), -1, dtype=np.intp)
            local[columns] = np.arange(len(kept), dtype=np.intp)
            out[d] = (sel, peer, local)
        iso_in, iso_eg = self.isolating["ingress"], self.isolating["egress"]
        declares = np.zeros(self.k, dtype=np.bool_)
        declares[self._declaring.get((port, protocol), [])] = True
        s_in, p_in, local_in = out["ingress"]
        s_eg, p_eg, local_eg = out["egress"]
        return _PortMatrices(
            s_in,
            p_in,
            s_eg,
            p_eg,
            _Counts(s_in, p_in),
            _Counts(s_eg, p_eg),
            iso_in,
            iso_eg,
            declares,
            local_in,
            local_eg,
        )


@dataclass(frozen=True)
class Block:
    """A part of the truth table: source classes `rows` x destination classes `cols`, with which
    pairs flip and which are allowed as the policies stand."""

    rows: IntArray
    cols: IntArray
    flips: BoolArray
    allowed: BoolArray


# --- choosing pods --------------------------------------------------------------------------------


def _is_running(pod: Pod) -> bool:
    return pod.phase == "Running" and bool(pod.ips) and bool(pod.node) and pod.workload is None


class _Pods:
    """The pods of each class that can send (`sources`) or receive (`destinations`) a witness."""

    def __init__(self, model: ClassModel, *, running_only: bool) -> None:
        self.sources: dict[int, list[Pod]] = {}
        self.destinations: dict[int, list[Pod]] = {}
        for i, pod in enumerate(model.snapshot.pods):
            if pod.host_network or (running_only and not _is_running(pod)):
                continue
            cls = int(model.class_of[i])
            self.sources.setdefault(cls, []).append(pod)
            if not is_probe_pod(pod):
                self.destinations.setdefault(cls, []).append(pod)
        for pods in self.sources.values():  # real pods first, probe pods only when none runs
            pods.sort(key=lambda p: (is_probe_pod(p), p.key))
        for pods in self.destinations.values():
            pods.sort(key=lambda p: p.key)
        self.source_mask = np.zeros(model.classes, dtype=np.bool_)
        self.destination_mask = np.zeros(model.classes, dtype=np.bool_)
        self.source_mask[list(self.sources)] = True
        self.destination_mask[list(self.destinations)] = True

    def pair(self, s: int, d: int) -> tuple[Pod, Pod] | None:
        for destination in self.destinations.get(d, ()):
            for source in self.sources.get(s, ()):
                if source.key != destination.key:
                    return source, destination
        return None


# --- planning -------------------------------------------------------------------------------------


def _rule_text(rule: Rule, direction: Direction) -> str:
    side = "from" if direction == "ingress" else "to"
    peers = "; ".join(p.describe() for p in rule.peers) if rule.peers else f"any {side}"
    ports = ", ".join(p.describe() for p in rule.ports) if rule.ports else "any port"
    return f"{side} {peers}; ports {ports}"


def _entry_ports(
    entry: PolicyPort, destination_ports: Sequence[tuple[int, Protocol]]
) -> list[tuple[int, Protocol, str]]:
    """(port, protocol, via) a port entry can be proven on."""
    if entry.port is None:
        declared = [(p, pr) for p, pr in destination_ports if pr == entry.protocol]
        return [(p, pr, f"any {pr} port") for p, pr in declared] or [
            (FALLBACK_PORT[0] if entry.protocol == "TCP" else 53, entry.protocol, "any port")
        ]
    if isinstance(entry.port, str):
        return []  # resolved per destination class: see _named_ports
    if entry.end_port is not None and entry.end_port > entry.port:
        return [(entry.port + 1, entry.protocol, f"inside {entry.port}-{entry.end_port}")]
    return [(entry.port, entry.protocol, "")]


class _Planner:
    def __init__(self, snapshot: Snapshot, model: ClassModel, *, running_only: bool) -> None:
        self.snapshot = snapshot
        self.model = model
        self.pods = _Pods(model, running_only=running_only)
        self.declared_ports: dict[int, list[tuple[int, Protocol]]] = {}
        for i, pod in enumerate(snapshot.pods):
            cls = int(model.class_of[i])
            ports = self.declared_ports.setdefault(cls, [])
            for cp in pod.ports:
                if (cp.port, cp.protocol) not in ports:
                    ports.append((cp.port, cp.protocol))
        self.mats = _Matrices(model, self.declared_ports)
        self.everyone = np.arange(model.classes)
        self.isolators = self.mats.isolating  # policies isolating each class, per direction
        self.all_declared = sorted(
            {pp for ports in self.declared_ports.values() for pp in ports},
            key=lambda pp: (pp[1], pp[0]),
        )
        self.rule_rows = {
            d: {(pi, ri): j for j, (pi, ri, _) in enumerate(self.mats.rows[d])}
            for d in ("ingress", "egress")
        }
        self.policy_rows: dict[Direction, dict[int, IntArray]] = {}
        directions: tuple[Direction, ...] = ("ingress", "egress")
        for d in directions:
            grouped: dict[int, list[int]] = {}
            for j, (pi, _, _) in enumerate(self.mats.rows[d]):
                grouped.setdefault(pi, []).append(j)
            self.policy_rows[d] = {pi: np.array(js, dtype=np.intp) for pi, js in grouped.items()}
        self.externals = self._external_addresses()

    # -- ports -------------------------------------------------------------------------------------

    def _named_ports(
        self, entry: PolicyPort, classes: BoolArray
    ) -> list[tuple[int, Protocol, str]]:
        assert isinstance(entry.port, str)
        col = self.model.named.get((entry.port, entry.protocol))
        if col is None:
            return []
        numbers = self.model.named_ports[classes, col] if classes.any() else np.zeros(0)
        found = sorted({int(n) for n in numbers if n >= 0})
        return [(n, entry.protocol, f"named port {entry.port}") for n in found]

    def _candidate_ports(
        self, policy: NetworkPolicy, selected: BoolArray
    ) -> list[tuple[int, Protocol, str]]:
        ports: list[tuple[int, Protocol, str]] = []
        everyone = np.ones(self.model.classes, dtype=np.bool_)
        for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress)):
            targets = selected if direction == "ingress" else everyone
            for rule in rules:
                for entry in rule.ports:
                    if isinstance(entry.port, str):
                        ports += self._named_ports(entry, targets)
                    else:
                        ports += _entry_ports(entry, self.all_declared)
        for cls in np.flatnonzero(selected):
            ports += [(p, pr, "") for p, pr in self.declared_ports.get(int(cls), [])]
        ports += [(*pp, "") for pp in self.all_declared]
        ports.append((*FALLBACK_PORT, ""))
        seen: dict[tuple[int, Protocol], tuple[int, Protocol, str]] = {}
        for port, protocol, via in ports:
            key = (port, protocol)
            if key not in seen or (via and not seen[key][2]):
                seen[key] = (port, protocol, via)
        return list(seen.values())

    # -- the flips ---------------------------------------------------------------------------------

    # A removal changes verdicts only where its policy selects: the destinations of an ingress
    # rule or isolation, the sources of an egress one. Every computation below works on that
    # block, rows (source classes) x columns (destination classes), never on the whole table.

    def _policy_flips(
        self, pi: int, m: _PortMatrices, sel: IntArray, direction: Direction
    ) -> Block:
        """Pairs whose verdict changes without policy `pi`, on the block of `direction`."""
        policy = self.model.policies[pi]
        rows, cols = (self.everyone, sel) if direction == "ingress" else (sel, self.everyone)
        ingress = self._ingress(m, cols, rows)  # [d, s]
        egress = self._egress(m, rows, cols)  # [s, d]
        allowed = egress & ingress.T
        if "ingress" in policy.policy_types:
            j = self.policy_rows["ingress"].get(pi)
            inside = self.model.selected[cols, pi]  # destinations of the block P selects
            cnt = self._cnt_in(m, cols, rows)
            if j is not None and len(j := m.columns("ingress", j)):
                cnt = cnt - m.s_in[np.ix_(cols, j)] @ self._sub(m.p_in, j, rows)
            iso = m.iso_in[cols] - inside.astype(np.float32)
            ingress = (iso[:, None] == 0) | (cnt > 0)
        if "egress" in policy.policy_types:
            j = self.policy_rows["egress"].get(pi)
            inside = self.model.selected[rows, pi]
            cnt = self._cnt_eg(m, rows, cols)
            if j is not None and len(j := m.columns("egress", j)):
                cnt = cnt - m.s_eg[np.ix_(rows, j)] @ self._sub(m.p_eg, j, cols)
            iso = m.iso_eg[rows] - inside.astype(np.float32)
            egress = (iso[:, None] == 0) | (cnt > 0)
        without = egress & ingress.T
        return Block(rows, cols, np.asarray(allowed != without, dtype=np.bool_), allowed)

    def _ingress(self, m: _PortMatrices, cols: IntArray, rows: IntArray) -> BoolArray:
        """[d, s] for destinations `cols` and sources `rows`: does ingress at d admit s?"""
        cnt = self._cnt_in(m, cols, rows)
        return np.asarray((m.iso_in[cols][:, None] == 0) | (cnt > 0), dtype=np.bool_)

    def _egress(self, m: _PortMatrices, rows: IntArray, cols: IntArray) -> BoolArray:
        """[s, d] for sources `rows` and destinations `cols`: does egress of s admit d?"""
        cnt = self._cnt_eg(m, rows, cols)
        return np.asarray((m.iso_eg[rows][:, None] == 0) | (cnt > 0), dtype=np.bool_)

    def _cnt_in(self, m: _PortMatrices, cols: IntArray, rows: IntArray) -> FloatArray:
        """Ingress counts [d in cols, s in rows]; one of the two is every class."""
        return m.cnt_in.block(cols, rows, whole_rows=rows is self.everyone)

    def _cnt_eg(self, m: _PortMatrices, rows: IntArray, cols: IntArray) -> FloatArray:
        """Egress counts [s in rows, d in cols]; one of the two is every class."""
        return m.cnt_eg.block(rows, cols, whole_rows=cols is self.everyone)

    def _sub(self, a: npt.NDArray[Any], rows: IntArray, cols: IntArray) -> npt.NDArray[Any]:
        """a[rows][:, cols], slicing a whole axis instead of gathering it."""
        if rows is self.everyone:
            return a[:, cols]
        if cols is self.everyone:
            return a[rows, :]
        return a[np.ix_(rows, cols)]

    def _rule_flips(self, direction: Direction, j: int, m: _PortMatrices, sel: IntArray) -> Block:
        """Pairs only rule row `j` allows on this port (its policy still isolates without it)."""
        if direction == "ingress":
            rows, cols = self.everyone, sel
            cnt = self._cnt_in(m, cols, rows)
            if (c := m.local_in[j]) >= 0:
                cnt = cnt - np.outer(m.s_in[cols, c], m.p_in[c, rows])
            ingress = (m.iso_in[cols][:, None] == 0) | (cnt > 0)
            egress_now = self._egress(m, rows, cols)
            without = egress_now & ingress.T
            allowed = egress_now & self._ingress(m, cols, rows).T
        else:
            rows, cols = sel, self.everyone
            cnt = self._cnt_eg(m, rows, cols)
            if (c := m.local_eg[j]) >= 0:
                cnt = cnt - np.outer(m.s_eg[rows, c], m.p_eg[c, cols])
            egress = (m.iso_eg[rows][:, None] == 0) | (cnt > 0)
            ingress_now = self._ingress(m, cols, rows)
            without = egress & ingress_now.T
            allowed = self._egress(m, rows, cols) & ingress_now.T
        return Block(rows, cols, np.asarray(allowed & ~without, dtype=np.bool_), allowed)

    def _pick(
        self, block: Block, mask: BoolArray, prefer: BoolArray | None = None
    ) -> tuple[Pod, Pod] | None:
        """A (source, destination) pair of pods from the first usable class pair of the block."""
        usable = mask & self.pods.source_mask[block.rows][:, None]
        usable &= self.pods.destination_mask[block.cols][None, :]
        order = [usable & prefer, usable] if prefer is not None else [usable]
        for candidates in order:
            for r, c in zip(*np.nonzero(candidates), strict=True):
                pair = self.pods.pair(int(block.rows[r]), int(block.cols[c]))
                if pair is not None:
                    return pair
        return None

    # -- one policy --------------------------------------------------------------------------------

    def policy(self, pi: int) -> PolicyEvidencePlan:
        policy = self.model.policies[pi]
        sel = np.asarray(self.model.selected[:, pi], dtype=np.bool_)
        rules = self._rules_of(pi)
        if not sel.any():
            reason = "it selects no pod"
            return PolicyEvidencePlan(
                policy=policy.key,
                namespace=policy.namespace,
                name=policy.name,
                source=policy.source,
                witnesses=(),
                rules=tuple(RuleEvidencePlan(r.rule, r.text, (), reason) for r in rules),
                unprovable=reason,
                lint=(f"{policy.key} selects no pod",),
            )
        ports = self._candidate_ports(policy, sel)
        chosen = np.flatnonzero(sel)
        own: list[Witness] = []
        removal_matters = False  # does removing the whole policy change some verdict?
        directions: tuple[Direction, ...] = ("ingress", "egress")
        kinds: tuple[WitnessKind, ...] = ("isolation", "removal")
        for direction in directions:
            if direction not in policy.policy_types:
                continue
            for kind in kinds:
                found = self._policy_witness(pi, direction, kind, ports, chosen)
                if found is not None:
                    removal_matters = True
                    if found[1]:
                        own.append(found[0])
        external = self._external_witnesses(pi, ports)
        own += external
        removal_matters = removal_matters or bool(external)
        rule_plans = [self._rule_plan(pi, r, ports, chosen) for r in rules]
        # A removal witness that a rule's witness probes already is one probe: keep the rule's.
        by_rules = {w.flow_key for r in rule_plans for w in r.witnesses}
        own = [w for w in own if w.kind != "removal" or w.flow_key not in by_rules]
        lint = [
            f"{r.rule.key} is {r.unprovable}"
            for r in rule_plans
            if r.unprovable.startswith("shadowed")
        ]
        unprovable = ""
        if not removal_matters:
            lint.insert(
                0,
                f"{policy.key} is redundant: removing it changes no verdict (other policies "
                "isolate the same pods and allow what it allows)",
            )
        if not own and not any(r.witnesses for r in rule_plans):
            if removal_matters or any(
                r.unprovable.startswith("no running pod") for r in rule_plans
            ):
                unprovable = "no running pod can send or receive its witnesses"
            elif self._only_external(policy):
                unprovable = (
                    "its effect is only on addresses outside the cluster: declare one "
                    "(`to: {cidr: ...}` in a FlowExpectations) to prove it"
                )
            else:
                unprovable = "redundant: removing it changes no verdict"
        return PolicyEvidencePlan(
            policy=policy.key,
            namespace=policy.namespace,
            name=policy.name,
            source=policy.source,
            witnesses=tuple(own),
            rules=tuple(rule_plans),
            unprovable=unprovable,
            lint=tuple(lint),
        )

    def _rules_of(self, pi: int) -> list[RuleEvidencePlan]:
        policy = self.model.policies[pi]
        out = []
        for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress)):
            for index, rule in enumerate(rules):
                ref = RuleRef(policy.key, direction, index)  # type: ignore[arg-type]
                out.append(RuleEvidencePlan(ref, _rule_text(rule, direction), ()))  # type: ignore[arg-type]
        return out

    def _policy_witness(
        self,
        pi: int,
        direction: Direction,
        kind: WitnessKind,
        ports: Sequence[tuple[int, Protocol, str]],
        sel: IntArray,
    ) -> tuple[Witness, bool] | None:
        """(witness, whether it can be probed) of one kind and direction, or None if none."""
        policy = self.model.policies[pi]
        # Isolation flips need P to be the only policy isolating a class for that direction;
        # removal flips need another one to remain. The counts do not depend on the port.
        counts = self.isolators[direction][sel]
        sel = sel[counts == 1] if kind == "isolation" else sel[counts >= 2]
        if not len(sel):
            return None
        if kind == "removal":
            # Only a port its rules admit can lose its last allowing rule with the policy.
            rules = policy.ingress if direction == "ingress" else policy.egress
            ports = [p for p in ports if any(self._admits(r, p[0], p[1]) for r in rules)]
        fallback: tuple[Witness, bool] | None = None
        for port, protocol, via in ports:
            m = self.mats.at(port, protocol)
            block = self._policy_flips(pi, m, sel, direction)
            flips = block.flips & (~block.allowed if kind == "isolation" else block.allowed)
            if not flips.any():
                continue
            pair = self._pick(block, flips, m.declares[block.cols][None, :])
            if pair is None:
                if fallback is None:
                    witness = self._witness_of(
                        policy, None, kind, direction, block, flips, port, protocol, via
                    )
                    fallback = (witness, False)
                continue
            return self._make(policy, None, kind, direction, *pair, port, protocol, via), True
        return fallback

    def _admits(self, rule: Rule, port: int, protocol: Protocol) -> bool:
        """Whether some port entry of `rule` admits the port on some class."""
        if not rule.ports:
            return True
        return bool(self.mats.entries_ok(rule.ports, port, protocol).any())

    def _witness_of(
        self,
        policy: NetworkPolicy,
        rule: RuleRef | None,
        kind: WitnessKind,
        direction: Direction,
        block: Block,
        flips: BoolArray,
        port: int,
        protocol: Protocol,
        via: str,
    ) -> Witness:
        """A witness between class representatives (not probeable: for offline listing)."""
        r, c = (int(v[0]) for v in np.nonzero(flips))
        s, d = int(block.rows[r]), int(block.cols[c])
        return self._make(
            policy,
            rule,
            kind,
            direction,
            self.model.representative(s),
            self.model.representative(d),
            port,
            protocol,
            via,
        )

    def _make(
        self,
        policy: NetworkPolicy,
        rule: RuleRef | None,
        kind: WitnessKind,
        direction: Direction,
        source: Pod,
        destination: Endpoint,
        port: int,
        protocol: Protocol,
        via: str,
    ) -> Witness:
        subject = destination if direction == "ingress" else source
        name = endpoint_name(subject)
        what = "ingress" if direction == "ingress" else "egress"
        if kind == "isolation":
            why = f"denied only because {policy.key} isolates {name} for {what}"
            model = False
        elif kind == "removal":
            why = f"allowed only by the rules of {policy.key} ({what} of {name})"
            model = True
        else:
            assert rule is not None
            why = f"allowed only by {rule.key}"
            model = True
        return Witness(
            policy=policy.key,
            rule=rule,
            kind=kind,
            direction=direction,
            source=source,
            destination=destination,
            port=port,
            protocol=protocol,
            model=model,
            why=why,
            via=via,
        )

    def _rule_plan(
        self,
        pi: int,
        plan: RuleEvidencePlan,
        ports: Sequence[tuple[int, Protocol, str]],
        chosen: IntArray,
    ) -> RuleEvidencePlan:
        """Witnesses of one rule: flows only it allows, covering each peer and port entry."""
        policy = self.model.policies[pi]
        ref = plan.rule
        if ref.direction not in policy.policy_types:
            why = f"not enforced as written by design: {policy.key}'s policyTypes leave out {ref.direction}"
            return RuleEvidencePlan(ref, plan.text, (), why)
        rule = (policy.ingress if ref.direction == "ingress" else policy.egress)[ref.index]
        j = self.rule_rows[ref.direction][(pi, ref.index)]
        sel = np.asarray(self.model.selected[:, pi], dtype=np.bool_)
        targets = sel if ref.direction == "ingress" else np.ones(self.model.classes, dtype=np.bool_)
        entries: list[list[tuple[int, Protocol, str]]] = []
        for entry in rule.ports:
            if isinstance(entry.port, str):
                entries.append(self._named_ports(entry, targets))
            else:
                entries.append(_entry_ports(entry, self.all_declared))
        if not rule.ports:
            entries.append(list(ports))
        peers = self._peer_columns(ref.direction, j)
        uncovered = set(range(len(peers)))
        witnesses: dict[str, Witness] = {}
        flipped = False

        def peer_mask(pc: int | None, block: Block) -> BoolArray:
            if pc is None:
                return np.ones_like(block.flips)
            # An ingress rule's peers are sources (rows); an egress rule's, destinations.
            if ref.direction == "ingress":
                return np.asarray(peers[pc][block.rows][:, None])
            return np.asarray(peers[pc][block.cols][None, :])

        def cover(entry_ports: Sequence[tuple[int, Protocol, str]], all_peers: bool) -> bool:
            nonlocal flipped
            for port, protocol, via in entry_ports:
                m = self.mats.at(port, protocol)
                block = self._rule_flips(ref.direction, j, m, chosen)
                if not block.flips.any():
                    continue
                flipped = True
                made = False
                for pc in sorted(uncovered) if uncovered else [None]:
                    pair = self._pick(
                        block, block.flips & peer_mask(pc, block), m.declares[block.cols][None, :]
                    )
                    if pair is None:
                        continue
                    w = self._make(policy, ref, "allow", ref.direction, *pair, port, protocol, via)
                    witnesses.setdefault(w.flow_key, w)
                    made = True
                    if pc is not None:
                        uncovered.discard(pc)
                    if not all_peers:
                        break
                if made:
                    return True
            return False

        for entry_ports in entries:  # each port entry once, covering what peers it can
            cover(entry_ports, all_peers=True)
        for entry_ports in entries:  # peers still uncovered, on any entry's ports
            if not uncovered:
                break
            cover(entry_ports, all_peers=True)
        if witnesses:
            return RuleEvidencePlan(ref, plan.text, tuple(witnesses.values()))
        if flipped:
            why = "no running pod can send or receive its witnesses"
        elif self._rule_only_external(rule):
            why = "its peers are only addresses outside the cluster"
        elif not self._rule_matches_any(ref.direction, j):
            why = "its peers match no pod"
        else:
            why = "shadowed: other rules allow everything it allows"
        return RuleEvidencePlan(ref, plan.text, (), why)

    def _peer_columns(self, direction: Direction, j: int) -> list[BoolArray]:
        rows = self.model.rules_in if direction == "ingress" else self.model.rules_eg
        cols = rows[j].peers
        if cols is None:
            return []
        return [np.asarray(self.model.peer_match[:, c], dtype=np.bool_) for c in cols]

    def _rule_matches_any(self, direction: Direction, j: int) -> bool:
        return bool(self.mats.peers(direction, j).any())

    @staticmethod
    def _rule_only_external(rule: Rule) -> bool:
        return bool(rule.peers) and all(p.ip_block is not None for p in rule.peers)

    def _only_external(self, policy: NetworkPolicy) -> bool:
        rules = policy.ingress + policy.egress
        return bool(rules) and all(self._rule_only_external(r) for r in rules)

    # -- addresses outside the cluster ------------------------------------------------------------

    def _external_addresses(self) -> list[str]:
        found = []
        for document in self.snapshot.expectations:
            for flow in document.flows:
                target = flow.destination
                if isinstance(target, ExternalTarget) and target.cidr is not None:
                    address = external_address(target)
                    if address is not None and address not in found:
                        found.append(address)
        return found

    def _external_witnesses(
        self, pi: int, ports: Sequence[tuple[int, Protocol, str]]
    ) -> list[Witness]:
        """Egress witnesses towards declared external addresses (one per policy at most)."""
        policy = self.model.policies[pi]
        if "egress" not in policy.policy_types or not self.externals:
            return []
        without = Engine(
            Snapshot(
                namespaces=self.snapshot.namespaces,
                pods=self.snapshot.pods,
                policies=tuple(p for p in self.snapshot.policies if p.key != policy.key),
            )
        )
        engine = Engine(self.snapshot)
        sources = [
            pods[0]
            for cls, pods in sorted(self.pods.sources.items())
            if self.model.selected[cls, pi]
        ]
        wanted = [
            (p, pr, v)
            for p, pr, v in ports
            if any(e.port == p or e.port is None for r in policy.egress for e in r.ports)
            or not any(r.ports for r in policy.egress)
        ]
        for address in self.externals:
            for source in sources:
                for port, protocol, via in wanted or ports[:1]:
                    model = engine.evaluate(source, address, port, protocol).allowed
                    if model == without.evaluate(source, address, port, protocol).allowed:
                        continue
                    kind: WitnessKind = "removal" if model else "isolation"
                    why = (
                        f"allowed only by the rules of {policy.key} (egress of {source.key} to "
                        f"{address}, declared in expectations)"
                        if model
                        else f"denied only because {policy.key} isolates {source.key} for egress"
                    )
                    return [
                        Witness(
                            policy.key,
                            None,
                            kind,
                            "egress",
                            source,
                            address,
                            port,
                            protocol,
                            model,
                            why,
                            via,
                        )
                    ]
        return []


def plan_evidence(
    snapshot: Snapshot,
    *,
    model: ClassModel | None = None,
    running_only: bool = True,
    policies: Iterable[str] | None = None,
) -> EvidencePlan:
    """Every policy's witnesses (or why it has none).

    `running_only` picks witnesses among pods that run and have an IP (the live loop); offline
    (`flowproof evidence`) every pod of the manifests may stand in. `policies` limits the plan to
    these policy keys (the others are left out).
    """
    model = model or ClassModel(snapshot)
    planner = _Planner(snapshot, model, running_only=running_only)
    wanted = set(policies) if policies is not None else None
    plans = [
        planner.policy(pi)
        for pi, policy in enumerate(model.policies)
        if wanted is None or policy.key in wanted
    ]
    return EvidencePlan(tuple(plans))


def pending_evidence(snapshot: Snapshot, reason: str) -> EvidencePlan:
    """Every policy of `snapshot`, its witnesses not chosen yet (PENDING, for `reason`)."""
    return EvidencePlan(
        tuple(
            PolicyEvidencePlan(p.key, p.namespace, p.name, p.source, (), ())
            for p in snapshot.policies
        ),
        pending=reason,
    )


# --- the status of a policy from its witnesses' flows ---------------------------------------------


@dataclass(frozen=True)
class WitnessResult:
    """A witness with the status of the flow that probes it (None: not planned as a flow)."""

    witness: Witness
    status: Status | None
    reason: str = ""
    reality: str | None = None


@dataclass(frozen=True)
class RuleEvidence:
    rule: RuleRef
    text: str
    status: EvidenceStatus
    reason: str
    witnesses: tuple[WitnessResult, ...] = ()


@dataclass(frozen=True)
class PolicyEvidence:
    policy: str
    namespace: str
    name: str
    status: EvidenceStatus
    reason: str
    witnesses: tuple[WitnessResult, ...]
    rules: tuple[RuleEvidence, ...]
    lint: tuple[str, ...] = ()
    source: str = ""


def _status_of(results: Sequence[WitnessResult], unprovable: str) -> tuple[EvidenceStatus, str]:
    if not results:
        return "UNPROVABLE", unprovable or "no witness"
    drifting = [r for r in results if r.status == "ENFORCEMENT_DRIFT"]
    if drifting:
        first = drifting[0]
        return "NOT_ENFORCED", f"{first.witness.describe()}; but {first.reason}"
    if all(r.status == "PASS" for r in results):
        return "PROVEN", f"{len(results)} witness(es) passed"
    waiting = [r for r in results if r.status != "PASS"]
    first = waiting[0]
    return "PENDING", f"{len(waiting)} of {len(results)} witness(es) not proven yet: " + (
        f"{first.witness.describe()} is {first.status or 'not planned'}"
        + (f" ({first.reason})" if first.reason else "")
    )


@dataclass(frozen=True)
class FlowOutcome:
    """How a witness flow stands. `suspects` are the policies whose failure to be enforced would
    explain it failing: the rules that allow it on either side, or the policies that isolate the
    side that denies it (from its verdict; empty: every policy that it witnesses)."""

    status: Status
    reason: str
    reality: str | None = None
    suspects: frozenset[str] = frozenset()


def evidence_of(plan: EvidencePlan, flows: Mapping[str, FlowOutcome]) -> list[PolicyEvidence]:
    """Every policy's evidence status from the statuses of its witnesses' flows (by flow key)."""
    out = []
    for policy in plan.policies:
        if plan.pending:
            out.append(
                PolicyEvidence(
                    policy.policy,
                    policy.namespace,
                    policy.name,
                    "PENDING",
                    plan.pending,
                    (),
                    (),
                    policy.lint,
                    policy.source,
                )
            )
            continue

        def results(witnesses: Sequence[Witness]) -> tuple[WitnessResult, ...]:
            found = []
            for w in witnesses:
                flow = flows.get(w.flow_key)
                found.append(
                    WitnessResult(
                        w,
                        flow.status if flow else None,
                        flow.reason if flow else "",
                        flow.reality if flow else None,
                    )
                )
            return tuple(found)

        rules = []
        for rule in policy.rules:
            rr = results(rule.witnesses)
            status, reason = _status_of(rr, rule.unprovable)
            rules.append(RuleEvidence(rule.rule, rule.text, status, reason, rr))
        own = results(policy.witnesses)
        everything = own + tuple(r for rule in rules for r in rule.witnesses)
        status, reason = _status_of(everything, policy.unprovable)
        if status == "NOT_ENFORCED":
            culprit = next(r for r in everything if r.status == "ENFORCEMENT_DRIFT")
            reason = f"{culprit.witness.subject} not enforced: {reason}"
            others = sorted(flows[culprit.witness.flow_key].suspects - {policy.policy})
            if others:
                # A dropped flow allowed by a rule on each side cannot tell which side drops it.
                reason += f" (or {', '.join(others)} is not: the probe cannot tell which side)"
        out.append(
            PolicyEvidence(
                policy.policy,
                policy.namespace,
                policy.name,
                status,
                reason,
                own,
                tuple(rules),
                policy.lint,
                policy.source,
            )
        )
    return out


__all__ = [
    "EVIDENCE_STATUSES",
    "WITNESS_KEY_PREFIX",
    "EvidencePlan",
    "EvidenceStatus",
    "FlowOutcome",
    "PolicyEvidence",
    "PolicyEvidencePlan",
    "RuleEvidence",
    "RuleEvidencePlan",
    "RuleRef",
    "Witness",
    "WitnessResult",
    "evidence_of",
    "pending_evidence",
    "plan_evidence",
]
