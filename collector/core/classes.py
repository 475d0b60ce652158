"""Whole-cluster reachability through equivalence classes of pods (the engine's fast path).

Two pods that every policy selector, every peer and every ipBlock treats alike, and whose container
ports carry the same referenced names, get the same verdict towards any third pod. Such pods form
one class. A pod's *signature* is the sorted tuple of its features, gathered by the extractors of
`signature_extractors` (one per kind of feature; a new policy kind adds its own), and pods with
equal signatures share a class: the cost grows with the features pods carry, not pods × features.
Verdicts are computed per pair of classes, block by block over packed bit rows, and counts are
weighted by class sizes. The tiers of cluster policies (and other plugins' objects) are
collector.core.tiers': one more per-pod feature (`_TierFeatures`), and a tier-ordered combination
in `allowed_matrix` and `counts`. Same semantics as `collector.core.engine`; pure, no I/O.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol as TypingProtocol

import numpy as np
import numpy.typing as npt

from collector.core.model import LabelSelector, NetworkPolicy, Peer, Pod, Protocol, Snapshot
from collector.core.tiers import TierFeature, TierModel

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]

_VALUE_BITS = 17  # a signature code is (global column << 17) | value; values are port numbers
_BLOCK_CELLS = 1 << 23  # class pairs evaluated at once (bounds the memory of a query)


@dataclass(frozen=True)
class Counts:
    """Allowed and denied ordered pod pairs (self pairs included) on one port."""

    allowed: int
    denied: int
    classes: int
    pods: int
    unknown: int = 0  # pairs whose model is unknown (counted in allowed or denied as modelled)


@dataclass(frozen=True)
class _RuleRow:
    policy: int
    peers: tuple[int, ...] | None  # peer column indices; None = every peer
    ports: tuple[tuple[Protocol, int | str | None, int | None], ...]  # empty = every port


# --- the pods as the extractors see them ------------------------------------------------------------


class LabelIndex:
    """Distinct label sets with an inverted index: a selector is tested only on the label sets
    found under its most selective requirement (a matchLabels pair, an `In` or an `Exists`)."""

    def __init__(self, label_sets: Sequence[Mapping[str, str]]) -> None:
        self.sets = label_sets
        self._pairs: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._keys: dict[str, list[int]] = defaultdict(list)
        for i, labels in enumerate(label_sets):
            for key, value in labels.items():
                self._pairs[(key, value)].append(i)
                self._keys[key].append(i)

    def candidates(self, selector: LabelSelector, bound: int | None = None) -> Sequence[int] | None:
        """The fewest label sets a match must be among, or None when any may match (or when no
        requirement narrows them below `bound`)."""
        best: Sequence[int] | None = None
        limit = len(self.sets) if bound is None else bound
        unions: list[list[list[int]]] = []
        for pair in selector.match_labels:
            found = self._pairs.get(pair, [])
            if len(found) < limit:
                best, limit = found, len(found)
        for req in selector.match_expressions:
            if req.operator == "In":
                lists = [self._pairs.get((req.key, v), []) for v in req.values]
                size = sum(len(x) for x in lists)
                if size < limit:
                    best, limit = None, size
                    unions = [lists]
            elif req.operator == "Exists":
                found = self._keys.get(req.key, [])
                if len(found) < limit:
                    best, limit, unions = found, len(found), []
        if unions:
            return sorted({i for x in unions[0] for i in x})
        return best

    def matching(self, selector: LabelSelector) -> list[int]:
        found = self.candidates(selector)
        ids: Sequence[int] = range(len(self.sets)) if found is None else found
        return [i for i in ids if selector.matches(self.sets[i])]


class PodIndex:
    """The snapshot's pods grouped into *cells* (namespace and label set, pod network only), and
    their addresses sorted, so that extractors evaluate each selector once per cell it may match
    and find an ipBlock's pods by binary search."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        pods = snapshot.pods
        cells: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
        self.cell_labels: list[Mapping[str, str]] = []
        self.cell_namespace: list[str] = []
        self.cells_in: dict[str, list[int]] = defaultdict(list)
        cell_of = np.full(len(pods), -1, dtype=np.int64)
        for i, pod in enumerate(pods):
            if pod.host_network:
                continue  # selected by no policy and matched by no selector: no cell features
            key = (pod.namespace, frozenset(pod.labels.items()))
            cell = cells.get(key)
            if cell is None:
                cell = cells[key] = len(self.cell_labels)
                self.cell_labels.append(pod.labels)
                self.cell_namespace.append(pod.namespace)
                self.cells_in[pod.namespace].append(cell)
            cell_of[i] = cell
        self.cell_of = cell_of
        self.labels = LabelIndex(self.cell_labels)
        self.namespace_names = sorted(self.cells_in)
        self._namespaces = LabelIndex(
            [snapshot.namespace_labels(name) for name in self.namespace_names]
        )
        self._ns_cache: dict[LabelSelector, list[str]] = {}
        self._cell_cache: dict[tuple[object, LabelSelector | None], list[int]] = {}
        self._addresses: dict[int, tuple[list[int], IntArray]] = {}

    @property
    def cells(self) -> int:
        return len(self.cell_labels)

    def namespaces_matching(self, selector: LabelSelector) -> list[str]:
        """Namespaces with pods whose labels the namespaceSelector matches."""
        found = self._ns_cache.get(selector)
        if found is None:
            found = [self.namespace_names[i] for i in self._namespaces.matching(selector)]
            self._ns_cache[selector] = found
        return found

    def cells_matching(
        self, selector: LabelSelector | None, namespaces: Sequence[str], scope: object
    ) -> list[int]:
        """Cells of `namespaces` whose labels `selector` matches (None: every cell). `scope` names
        the namespaces for the cache (a namespace name or the namespaceSelector)."""
        key = (scope, selector)
        found = self._cell_cache.get(key)
        if found is not None:
            return found
        in_scope = sum(len(self.cells_in.get(n, ())) for n in namespaces)
        candidates = self.labels.candidates(selector, in_scope) if selector is not None else None
        if candidates is not None:
            wanted = set(namespaces)
            assert selector is not None
            found = [
                c
                for c in candidates
                if self.cell_namespace[c] in wanted and selector.matches(self.cell_labels[c])
            ]
        else:
            found = [
                c
                for n in namespaces
                for c in self.cells_in.get(n, ())
                if selector is None or selector.matches(self.cell_labels[c])
            ]
        self._cell_cache[key] = found
        return found

    def pods_in_block(self, peer: Peer) -> IntArray:
        """Pods with an IP in the peer's ipBlock and outside its excepts (host network too)."""
        block = peer.ip_block
        assert block is not None
        family = block.cidr.version
        addresses, owners = self._sorted_addresses(family)
        if not addresses:
            return np.zeros(0, dtype=np.int64)

        def span(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
            start = int(net.network_address)
            return (
                bisect.bisect_left(addresses, start),
                bisect.bisect_left(addresses, start + net.num_addresses),
            )

        lo, hi = span(block.cidr)
        if lo >= hi:
            return np.zeros(0, dtype=np.int64)
        keep = np.ones(hi - lo, dtype=np.bool_)
        for ex in block.excepts:
            if ex.version == family:
                elo, ehi = span(ex)
                keep[max(elo, lo) - lo : max(min(ehi, hi) - lo, 0)] = False
        return np.unique(owners[lo:hi][keep])

    def _sorted_addresses(self, family: int) -> tuple[list[int], IntArray]:
        cached = self._addresses.get(family)
        if cached is None:
            entries = sorted(
                (int(addr), i)
                for i, pod in enumerate(self.snapshot.pods)
                for ip in pod.ips
                if (addr := ipaddress.ip_address(ip)).version == family
            )
            cached = ([a for a, _ in entries], np.array([i for _, i in entries], dtype=np.int64))
            self._addresses[family] = cached
        return cached


# --- the features of a signature ---------------------------------------------------------------------

CellFeatures = Iterator[tuple[int, Sequence[int]]]
"""(column, cells that carry it): features decided by namespace and labels alone."""
PodFeatures = Iterator[tuple[int, IntArray, IntArray | None]]
"""(column, pods that carry it, a value per pod or None): features of a pod itself."""


class FeatureExtractor(TypingProtocol):
    """One kind of feature of the class signature, in its own numbered columns.

    A feature is a column a pod has or has not (policy i selects it), optionally with a value the
    class must agree on (the port number behind a name, 1..65535). Pods with equal features in
    every extractor's columns fall into one class; `ClassModel.features[name]` gives the classes
    × columns table back.
    """

    name: str

    @property
    def columns(self) -> int: ...

    def cells(self, index: PodIndex) -> CellFeatures: ...

    def pods(self, index: PodIndex) -> PodFeatures: ...


class _Tables:
    """A snapshot's NetworkPolicies as numbered columns: policies, distinct peers, rules and the
    port names rules refer to."""

    def __init__(self, policies: Sequence[NetworkPolicy]) -> None:
        self.policies = policies
        self.peers: dict[tuple[str | None, Peer], int] = {}
        self.rules_in: list[_RuleRow] = []
        self.rules_eg: list[_RuleRow] = []
        self.named: dict[tuple[str, Protocol], int] = {}
        for pi, policy in enumerate(policies):
            for direction, rules, out in (
                ("ingress", policy.ingress, self.rules_in),
                ("egress", policy.egress, self.rules_eg),
            ):
                if direction not in policy.policy_types:
                    continue
                for rule in rules:
                    cols: list[int] = []
                    for peer in rule.peers:
                        # A podSelector alone selects in the policy's own namespace.
                        alone = peer.ip_block is None and peer.namespace_selector is None
                        key = (policy.namespace if alone else None, peer)
                        cols.append(self.peers.setdefault(key, len(self.peers)))
                    ports = tuple((e.protocol, e.port, e.end_port) for e in rule.ports)
                    for protocol, port, _ in ports:
                        if isinstance(port, str):
                            self.named.setdefault((port, protocol), len(self.named))
                    out.append(_RuleRow(pi, tuple(cols) if rule.peers else None, ports))


@dataclass
class _PolicySelection:
    """Column i: NetworkPolicy i selects the pod (its namespace, its podSelector; never a
    host-network pod)."""

    tables: _Tables
    name: str = "selected"

    @property
    def columns(self) -> int:
        return len(self.tables.policies)

    def cells(self, index: PodIndex) -> CellFeatures:
        for pi, policy in enumerate(self.tables.policies):
            yield (
                pi,
                index.cells_matching(policy.pod_selector, [policy.namespace], policy.namespace),
            )

    def pods(self, index: PodIndex) -> PodFeatures:
        return iter(())


@dataclass
class _PeerMembership:
    """Column j: distinct peer j (selectors within a scope, or an ipBlock) matches the pod."""

    tables: _Tables
    name: str = "peers"

    @property
    def columns(self) -> int:
        return len(self.tables.peers)

    def cells(self, index: PodIndex) -> CellFeatures:
        for (scope, peer), col in self.tables.peers.items():
            if peer.ip_block is not None:
                continue
            if scope is not None:
                yield col, index.cells_matching(peer.pod_selector, [scope], scope)
            else:
                assert peer.namespace_selector is not None
                namespaces = index.namespaces_matching(peer.namespace_selector)
                yield col, index.cells_matching(peer.pod_selector, namespaces, peer)

    def pods(self, index: PodIndex) -> PodFeatures:
        for (_, peer), col in self.tables.peers.items():
            if peer.ip_block is not None:
                yield col, index.pods_in_block(peer), None


@dataclass
class _NamedPorts:
    """Column k: the port number the pod gives the k-th (name, protocol) a rule refers to."""

    tables: _Tables
    name: str = "named_ports"

    @property
    def columns(self) -> int:
        return len(self.tables.named)

    def cells(self, index: PodIndex) -> CellFeatures:
        return iter(())

    def pods(self, index: PodIndex) -> PodFeatures:
        named = self.tables.named
        if not named:
            return
        members: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for i, pod in enumerate(index.snapshot.pods):
            seen: set[int] = set()
            for cp in pod.ports:
                col = named.get((cp.name, cp.protocol)) if cp.name else None
                if col is not None and col not in seen:  # the first container port wins
                    seen.add(col)
                    members[col][0].append(i)
                    members[col][1].append(cp.port)
        for col, (pods, ports) in members.items():
            yield col, np.array(pods, dtype=np.int64), np.array(ports, dtype=np.int64)


@dataclass
class _TierFeatures:
    """The tiers' per-pod feature (`collector.core.tiers.TierFeature`) as an interned id, split
    over two columns of 17 bits each; no column at all without cluster policies or other
    plugins' objects."""

    feature: TierFeature
    name: str = "tiers"

    @property
    def columns(self) -> int:
        return 2 if self.feature.active else 0

    def cells(self, index: PodIndex) -> CellFeatures:
        return iter(())

    def pods(self, index: PodIndex) -> PodFeatures:
        if not self.feature.active:
            return
        ids: dict[object, int] = {}
        values = np.array(
            [ids.setdefault(self.feature(pod), len(ids)) for pod in index.snapshot.pods],
            dtype=np.int64,
        )
        members = np.arange(len(values), dtype=np.int64)
        mask = (1 << _VALUE_BITS) - 1
        yield 0, members, values & mask
        yield 1, members, values >> _VALUE_BITS


def signature_extractors(tables: _Tables, snapshot: Snapshot) -> list[FeatureExtractor]:
    """Every kind of feature a class signature holds, in one place: a new policy kind adds its
    extractor here (the cluster policy tiers did)."""
    return [
        _PolicySelection(tables),
        _PeerMembership(tables),
        _NamedPorts(tables),
        _TierFeatures(TierFeature(snapshot)),
    ]


@dataclass(frozen=True)
class Incidence:
    """A sparse classes × columns table: entry (class, column, value) for every feature a class
    carries; `value` is 0 for plain membership."""

    shape: tuple[int, int]
    rows: IntArray
    cols: IntArray
    values: IntArray
    _by_column: list[IntArray] = field(default_factory=list, compare=False, repr=False)

    def dense(self) -> BoolArray:
        out = np.zeros(self.shape, dtype=np.bool_)
        out[self.rows, self.cols] = True
        return out

    def dense_values(self, missing: int = -1) -> IntArray:
        out = np.full(self.shape, missing, dtype=np.int64)
        out[self.rows, self.cols] = self.values
        return out

    def classes_of(self, col: int) -> IntArray:
        """The classes that carry column `col`, ascending."""
        if not self._by_column:
            order = np.lexsort((self.rows, self.cols))
            bounds = np.searchsorted(self.cols[order], np.arange(self.shape[1] + 1))
            rows = self.rows[order]
            self._by_column.extend(rows[bounds[i] : bounds[i + 1]] for i in range(self.shape[1]))
        return self._by_column[col]


def _group(owners: list[IntArray], codes: list[IntArray], size: int) -> list[tuple[int, ...]]:
    """Per owner (cell or pod), the sorted tuple of its codes."""
    if not owners:
        return [()] * size
    owner = np.concatenate(owners)
    code = np.concatenate(codes)
    order = np.lexsort((code, owner))
    owner, code = owner[order], code[order]
    bounds = np.flatnonzero(np.diff(owner)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(owner)]))
    tuples: list[tuple[int, ...]] = [()] * size
    flat = code.tolist()
    for who, start, end in zip(owner[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
        tuples[who] = tuple(flat[start:end])
    return tuples


# --- the class model ------------------------------------------------------------------------------


class ClassModel:
    """Pods grouped into classes, with everything a port query needs.

    Per class: `sizes`, `selected` [classes × policies], `peer_match` [classes × peers],
    `named_ports` [classes × referenced names, -1 when the pod has none]; the sparse tables of every
    extractor in `features`. `selected` and `peer_match` are built on first use from the sparse
    tables (at 100,000 pods they would be gigabytes that counting never needs).
    """

    def __init__(self, snapshot: Snapshot, *, like: ClassModel | None = None) -> None:
        """`like`: a model of a snapshot with the same policies, whose policy tables are reused
        (a model of a few pods then costs only those pods)."""
        self.snapshot = snapshot
        pods = snapshot.pods
        self.pod_count = len(pods)
        tables: _Tables = like._tables if like is not None else _Tables(snapshot.policies)
        self._tables: _Tables = tables
        self.policies = snapshot.policies
        self.rules_in = tables.rules_in
        self.rules_eg = tables.rules_eg
        self.named = tables.named
        self.peers = tables.peers
        index = PodIndex(snapshot)
        extractors = signature_extractors(tables, snapshot)

        # Gather every extractor's features as codes: (global column << bits) | value.
        offsets: list[int] = []
        total = 0
        for extractor in extractors:
            offsets.append(total)
            total += extractor.columns
        cell_owner: list[IntArray] = []
        cell_code: list[IntArray] = []
        pod_owner: list[IntArray] = []
        pod_code: list[IntArray] = []
        for offset, extractor in zip(offsets, extractors, strict=True):
            for col, cells in extractor.cells(index):
                if len(cells):
                    cell_owner.append(np.asarray(cells, dtype=np.int64))
                    cell_code.append(np.full(len(cells), (offset + col) << _VALUE_BITS))
            for col, members, values in extractor.pods(index):
                if len(members):
                    code = np.full(len(members), (offset + col) << _VALUE_BITS, dtype=np.int64)
                    pod_owner.append(members)
                    pod_code.append(code if values is None else code | values)
        cell_tuples = _group(cell_owner, cell_code, index.cells)
        pod_tuples = _group(pod_owner, pod_code, len(pods))

        # The signature: (the pod's cell features, its own features), each as an interned id.
        interned: dict[tuple[int, ...], int] = {(): 0}
        cell_sig = np.array(
            [interned.setdefault(t, len(interned)) for t in cell_tuples] + [0], dtype=np.int64
        )  # the extra last entry is the host-network pods' "cell" -1
        pod_sig = np.array(
            [interned.setdefault(t, len(interned)) for t in pod_tuples], dtype=np.int64
        )
        key = cell_sig[index.cell_of] * len(interned) + pod_sig
        if len(pods):
            _, first, inverse, sizes = np.unique(
                key, return_index=True, return_inverse=True, return_counts=True
            )
        else:
            first = inverse = sizes = np.zeros(0, dtype=np.int64)
        # Classes numbered by size (then by first pod), so that the weights of packed bit rows are
        # constant over long runs of bytes: a weighted count is then a popcount per run.
        order = np.lexsort((first, sizes))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        self.class_of = rank[inverse.reshape(-1)].astype(np.int64)
        self.first = first[order].astype(np.int64)
        self.sizes = sizes[order].astype(np.float64)
        self.classes = len(first)

        # Per class, the features of its first pod, split back per extractor.
        rows: list[int] = []
        codes: list[int] = []
        for cls, pod in enumerate(self.first.tolist()):
            cell = int(index.cell_of[pod])
            own = (cell_tuples[cell] if cell >= 0 else ()) + pod_tuples[pod]
            rows.extend([cls] * len(own))
            codes.extend(own)
        row_arr = np.array(rows, dtype=np.int64)
        code_arr = np.array(codes, dtype=np.int64)
        column = code_arr >> _VALUE_BITS
        value = code_arr & ((1 << _VALUE_BITS) - 1)
        self.features: dict[str, Incidence] = {}
        for offset, extractor in zip(offsets, extractors, strict=True):
            mine = (column >= offset) & (column < offset + extractor.columns)
            self.features[extractor.name] = Incidence(
                (self.classes, extractor.columns),
                row_arr[mine],
                column[mine] - offset,
                value[mine],
            )
        self.named_ports = self.features["named_ports"].dense_values()
        if not self.named:
            self.named_ports = np.full((self.classes, 1), -1, dtype=np.int64)
        self._tiers = TierModel(snapshot, [pods[i] for i in self.first.tolist()])
        self._ingress_rows: tuple[ByteArray, list[int]] | None = None
        self._ingress_peers: list[tuple[int, ...] | None] = []
        self._peer_rows: dict[tuple[int, ...] | None, ByteArray] = {}

    @cached_property
    def selected(self) -> BoolArray:
        """selected[c, i]: policy i selects the pods of class c."""
        return self.features["selected"].dense()

    @cached_property
    def peer_match(self) -> BoolArray:
        """peer_match[c, j]: distinct peer j matches the pods of class c."""
        return self.features["peers"].dense()

    def representative(self, cls: int) -> Pod:
        return self.snapshot.pods[int(self.first[cls])]

    @cached_property
    def pod_index(self) -> Mapping[str, int]:
        """Pod key -> its index in the snapshot (and in `class_of`), built on first use."""
        return {pod.key: i for i, pod in enumerate(self.snapshot.pods)}

    # -- one port query ------------------------------------------------------------------------------

    def _port_status(self, row: _RuleRow, port: int, protocol: Protocol) -> bool | BoolArray:
        """Does some port entry of the rule admit the port: for every class, none, or per class as
        the destination (a named port resolves on the destination)."""
        if not row.ports:
            return True
        ok: BoolArray | None = None
        for proto, entry, end in row.ports:
            if proto != protocol:
                continue
            if entry is None:
                return True
            if isinstance(entry, str):
                hit = self.named_ports[:, self.named[(entry, proto)]] == port
                ok = hit if ok is None else ok | hit
            elif (end is None and entry == port) or (end is not None and entry <= port <= end):
                return True
        return False if ok is None else ok

    def _peer_row(self, peers: tuple[int, ...] | None) -> ByteArray:
        """The classes a rule's peers match (None: every class), as packed bits."""
        row = self._peer_rows.get(peers)
        if row is None:
            if peers is None:
                bits = np.ones(self.classes, dtype=np.bool_)
            else:
                bits = np.zeros(self.classes, dtype=np.bool_)
                incidence = self.features["peers"]
                for col in peers:
                    bits[incidence.classes_of(col)] = True
            row = self._peer_rows[peers] = np.packbits(bits)
        return row

    def _selects(self, policy: int) -> IntArray:
        return self.features["selected"].classes_of(policy)

    def _isolated(self, direction: str) -> BoolArray:
        out = np.zeros(self.classes, dtype=np.bool_)
        for i, policy in enumerate(self.policies):
            if direction in policy.policy_types:
                out[self._selects(i)] = True
        return out

    def _ingress_matrix(self) -> tuple[ByteArray, list[int]]:
        """The peer rows of every ingress rule (port-independent), once per distinct peer list."""
        if self._ingress_rows is None:
            distinct: dict[tuple[int, ...] | None, int] = {}
            of_rule = [distinct.setdefault(r.peers, len(distinct)) for r in self.rules_in]
            self._ingress_peers = list(distinct)
            matrix = np.zeros((len(distinct), (self.classes + 7) // 8), dtype=np.uint8)
            for peers, i in distinct.items():
                matrix[i] = self._peer_row(peers)
            self._ingress_rows = (matrix, of_rule)
        return self._ingress_rows

    def _ingress_matrix_on(self, columns: IntArray) -> ByteArray:
        """The rows of `_ingress_matrix` restricted to the classes `columns` (ascending)."""
        self._ingress_matrix()
        where = np.full(self.classes, -1, dtype=np.int64)
        where[columns] = np.arange(len(columns))
        incidence = self.features["peers"]
        out = np.zeros((len(self._ingress_peers), (len(columns) + 7) // 8), dtype=np.uint8)
        for i, peers in enumerate(self._ingress_peers):
            bits = np.zeros(len(columns), dtype=np.bool_)
            if peers is None:
                bits[:] = True
            else:
                for col in peers:
                    hit = where[incidence.classes_of(col)]
                    bits[hit[hit >= 0]] = True
            out[i] = np.packbits(bits)
        return out

    def _sides(self, port: int, protocol: Protocol) -> tuple[_Side, _Side]:
        """(ingress, egress) for one port: per destination class d, the sources its ingress admits
        (`ingress.row(d)`); per source class s, the destinations its egress admits."""
        # ingress[d, s] = not isolated(d) or some rule of a policy selecting d admits (s, port).
        in_matrix, in_row_of = self._ingress_matrix()
        keys: list[IntArray] = []
        rows: list[IntArray] = []
        for j, row in enumerate(self.rules_in):
            status = self._port_status(row, port, protocol)
            if status is False:
                continue
            dests = self._selects(row.policy)
            if status is not True:
                dests = dests[status[dests]]
            keys.append(dests)
            rows.append(np.full(len(dests), in_row_of[j], dtype=np.int64))
        ingress = _Side(~self._isolated("ingress"), in_matrix, keys, rows)
        # egress[s, d] = not isolated(s) or some rule of a policy selecting s admits (d, port).
        eg_rows: list[ByteArray] = []
        keys, rows = [], []
        for row in self.rules_eg:
            status = self._port_status(row, port, protocol)
            if status is False:
                continue
            bits = self._peer_row(row.peers)
            if status is not True:
                bits = bits & np.packbits(status)
            sources = self._selects(row.policy)
            keys.append(sources)
            rows.append(np.full(len(sources), len(eg_rows), dtype=np.int64))
            eg_rows.append(bits)
        width = (self.classes + 7) // 8
        eg_matrix = np.stack(eg_rows) if eg_rows else np.zeros((0, width), dtype=np.uint8)
        return ingress, _Side(~self._isolated("egress"), eg_matrix, keys, rows)

    def allowed_matrix(self, port: int, protocol: Protocol) -> BoolArray:
        """allowed[s, d]: may a pod of class s reach a pod of class d (self pairs aside).

        Dense (classes²): for counting use `counts`, which never builds it."""
        return self._matrices(port, protocol)[0]

    def unknown_matrix(self, port: int, protocol: Protocol) -> BoolArray:
        """unknown[s, d]: is the model unknown for a pod of class s to a pod of class d."""
        return self._matrices(port, protocol)[1]

    def _matrices(self, port: int, protocol: Protocol) -> tuple[BoolArray, BoolArray]:
        """(allowed, unknown) as dense [source class, destination class] matrices."""
        ingress, egress = self._sides(port, protocol)
        if not self._tiers.active:
            allowed = egress.dense() & ingress.dense().T
            unknown = np.zeros((self.classes, self.classes), dtype=np.bool_)
            return np.asarray(allowed, dtype=np.bool_), unknown
        # The tiers around the NetworkPolicy tier: what the NetworkPolicy rules allow matters
        # only for the subjects NetworkPolicies isolate.
        tiers = self._tiers
        in_allowed, in_unknown = tiers.direction(
            "ingress", port, protocol, ingress.dense(), ~ingress.open
        )
        eg_allowed, eg_unknown = tiers.direction(
            "egress", port, protocol, egress.dense(), ~egress.open
        )
        allowed = eg_allowed & in_allowed.T
        unknown = eg_unknown | in_unknown.T | tiers.unmodelled()
        return np.asarray(allowed, dtype=np.bool_), np.asarray(unknown, dtype=np.bool_)

    def _tiered_counts(self, port: int, protocol: Protocol) -> Counts:
        """Counts with cluster policy tiers: over the dense class matrices (tiers are rare and
        their subjects few, so the classes stay few)."""
        allowed_matrix, unknown_matrix = self._matrices(port, protocol)
        sizes = self.sizes
        total = float(sizes @ allowed_matrix.astype(np.float64) @ sizes)
        unknown = round(float(sizes @ unknown_matrix.astype(np.float64) @ sizes))
        # Self pairs: a pod cannot block access to itself, whatever its class's verdict says.
        diagonal = np.diagonal(allowed_matrix)
        total += float(sizes.sum() - (sizes * diagonal).sum())
        n = self.pod_count
        allowed_pairs = round(total)
        return Counts(allowed_pairs, n * n - allowed_pairs, self.classes, n, unknown)

    def counts(self, port: int, protocol: Protocol) -> Counts:
        """Allowed and denied ordered pod pairs on `port`, weighted by class sizes.

        Pairs that no policy restricts on either side are counted as a product of sums; only the
        classes isolated on a side with a rule that admits the port have rows; and only where both
        the source and the destination are isolated must both rows be read together, on the
        isolated sources' columns alone.
        """
        n = self.pod_count
        if self.classes == 0:
            return Counts(0, 0, 0, n)
        if self._tiers.active:
            return self._tiered_counts(port, protocol)
        sizes = self.sizes
        ingress, egress = self._sides(port, protocol)
        weigh = _Weigher(sizes)
        # Sources and destinations that nothing isolates: every such pair is allowed.
        total = float(sizes[egress.open].sum() * sizes[ingress.open].sum())
        open_dest = np.packbits(ingress.open)
        open_source = np.packbits(egress.open)
        # Isolated sources towards destinations open for ingress.
        sources, eg_rows = egress.rows()
        for lo in range(0, len(sources), weigh.chunk):
            part = eg_rows[lo : lo + weigh.chunk] & open_dest
            total += float(sizes[sources[lo : lo + weigh.chunk]] @ weigh.rows(part))
        diagonal = ingress.open.copy()
        source_diagonal = egress.open.copy()
        source_diagonal[sources] = _bit(eg_rows, sources)
        # Isolated destinations from open sources, and from isolated ones: there both must admit.
        on_sources = _Weigher(sizes[sources])
        reaches = _transposed(eg_rows, sources, ingress.active)  # [dest, isolated source]
        narrowed = self._ingress_matrix_on(sources) if len(sources) else None
        for first in range(0, len(ingress.active), weigh.chunk):
            last = min(len(ingress.active), first + weigh.chunk)
            dests = ingress.active[first:last]
            in_rows = ingress.union(first, last)
            total += float(sizes[dests] @ weigh.rows(in_rows & open_source))
            diagonal[dests] = _bit(in_rows, dests)
            if narrowed is not None:
                admits = ingress.union(first, last, narrowed)
                total += float(sizes[dests] @ on_sources.rows(admits & reaches[first:last]))
        diagonal &= source_diagonal
        # Self pairs: a pod cannot block access to itself, whatever its class's verdict says.
        total += float(sizes.sum() - (sizes * diagonal).sum())
        allowed_pairs = round(total)
        return Counts(allowed_pairs, n * n - allowed_pairs, self.classes, n)


class _Side:
    """One direction of one port query: the classes it leaves open, and for each isolated class
    with a rule admitting the port (`active`, ascending), the union of those rules' rows."""

    def __init__(
        self, open_: BoolArray, matrix: ByteArray, keys: list[IntArray], rows: list[IntArray]
    ) -> None:
        self.open = open_
        self.classes = len(open_)
        self._matrix = matrix
        if keys:
            key = np.concatenate(keys)
            order = np.argsort(key, kind="stable")
            self._keys, self._rows = key[order], np.concatenate(rows)[order]
        else:
            self._keys = self._rows = np.zeros(0, dtype=np.int64)
        if len(self._keys):
            self._starts = np.concatenate(([0], np.flatnonzero(np.diff(self._keys)) + 1))
        else:
            self._starts = np.zeros(0, dtype=np.int64)
        self._ends = np.append(self._starts[1:], len(self._keys))
        self.active = self._keys[self._starts]  # isolated classes with at least one rule

    def union(self, first: int, last: int, matrix: ByteArray | None = None) -> ByteArray:
        """The rows of active[first:last]: the OR of their rules' rows (of `matrix`, by default
        the rows over every class)."""
        source = self._matrix if matrix is None else matrix
        starts, ends = self._starts[first:last], self._ends[first:last]
        out = source[self._rows[starts]]
        lengths = ends - starts
        for extra in range(1, int(lengths.max(initial=1))):  # a class has few rules: few passes
            more = np.flatnonzero(lengths > extra)
            out[more] |= source[self._rows[starts[more] + extra]]
        return out

    def rows(self) -> tuple[IntArray, ByteArray]:
        return self.active, self.union(0, len(self.active))

    def dense(self) -> BoolArray:
        """[subject, other] for every class pair (classes² booleans)."""
        out = np.repeat(self.open[:, None], self.classes, axis=1)
        classes, rows = self.rows()
        out[classes] = np.unpackbits(rows, axis=1, count=self.classes).astype(np.bool_)
        return out


class _Weigher:
    """Weighted popcounts of packed rows: Σ sizes[c] over the set bits c of each row. Classes are
    numbered by size, so the bytes fall into runs of one weight: a popcount per run, and a table
    of the 256 byte values for the few bytes where the weight changes (exact: integers < 2**53)."""

    def __init__(self, sizes: npt.NDArray[np.float64]) -> None:
        width = (len(sizes) + 7) // 8
        padded = np.zeros(width * 8, dtype=np.float64)
        padded[: len(sizes)] = sizes
        per_byte = padded.reshape(width, 8)
        pure = (per_byte == per_byte[:, :1]).all(axis=1)
        weight = np.where(pure, per_byte[:, 0], -1.0)
        # Runs of bytes of one weight; a mixed byte is a run of its own.
        change = np.flatnonzero((np.diff(weight) != 0) | ~pure[1:] | ~pure[:-1]) + 1
        self._starts = np.concatenate(([0], change)).astype(np.int64) if width else change
        self._weights = weight[self._starts] if width else weight
        mixed = np.flatnonzero(~pure)
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float64)
        self._mixed = mixed
        self._table = per_byte[mixed] @ bits.T  # [mixed byte, byte value]
        self._pure_runs = self._weights >= 0
        self.chunk = max(1, _BLOCK_CELLS // (8 * max(width, 1)))

    def rows(self, packed: ByteArray) -> npt.NDArray[np.float64]:
        if not packed.shape[1]:
            return np.zeros(len(packed), dtype=np.float64)
        counts = np.add.reduceat(np.bitwise_count(packed), self._starts, axis=1, dtype=np.int64)
        out: npt.NDArray[np.float64] = counts[:, self._pure_runs] @ self._weights[self._pure_runs]
        if len(self._mixed):
            out += self._table[np.arange(len(self._mixed)), packed[:, self._mixed]].sum(axis=1)
        return out


def _transposed(rows: ByteArray, subjects: IntArray, others: IntArray) -> ByteArray:
    """out[j, i] (packed over i) = rows[i] has the bit of others[j]: the rows of the subjects
    read by column, for the `others` classes (ascending) only."""
    out = np.zeros((len(others), (len(subjects) + 7) // 8), dtype=np.uint8)
    if not len(subjects) or not len(others):
        return out
    step = max(8, (_BLOCK_CELLS // len(subjects)) // 8 * 8)
    for lo in range(0, int(others[-1]) + 1, step):
        first, last = np.searchsorted(others, [lo, lo + step])
        if first == last:
            continue
        hi = min(lo + step, (rows.shape[1]) * 8)
        bits = np.unpackbits(rows[:, lo // 8 : (hi + 7) // 8], axis=1, count=hi - lo)
        out[first:last] = np.packbits(bits[:, others[first:last] - lo].T, axis=1)
    return out


def _bit(rows: ByteArray, classes: IntArray) -> BoolArray:
    """rows[i] has the bit of classes[i] set (the diagonal of a square selection)."""
    picked = rows[np.arange(len(classes)), classes // 8]
    return np.asarray((picked >> (7 - classes % 8)) & 1, dtype=np.bool_)


def reachability_counts(snapshot: Snapshot, port: int, protocol: Protocol) -> Counts:
    """Allowed and denied ordered pod pairs on one port, computed over classes of pods."""
    return ClassModel(snapshot).counts(port, protocol)


__all__ = [
    "ClassModel",
    "Counts",
    "FeatureExtractor",
    "Incidence",
    "LabelIndex",
    "PodIndex",
    "reachability_counts",
    "signature_extractors",
]
