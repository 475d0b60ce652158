"""The sweep: the model's whole truth table probed over time, class pair by class pair.

Owns `SweepTable`, the table of one snapshot: every (source class, destination class, port) where
the destination declares the port, in a rotating order that visits every cell once per turn (a
full-period permutation of the cell indices, so no cell waits for two turns while another is
probed twice), and the cell's flow between representative pods. A small share of each batch is
drawn at random instead, between random pods of random cells, so that a fault not tied to one
policy or one representative (a plugin bug on one peer shape, one node) is found too. Pure: no
I/O; which cells are due, and when, is collector.core.scheduling's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from collector.core.classes import ClassModel
from collector.core.model import Pod, Protocol, Snapshot
from collector.core.probepods import is_probe_pod

SWEEP_EXPECTATION = "(truth-table sweep)"


def _is_running(pod: Pod) -> bool:
    return pod.phase == "Running" and bool(pod.ips) and bool(pod.node) and pod.workload is None


@dataclass(frozen=True)
class SweepCell:
    """One cell of the truth table and the pods that probe it."""

    index: int
    source: Pod
    destination: Pod
    port: int
    protocol: Protocol
    random_pick: bool = False

    @property
    def cell_key(self) -> str:
        """The cell by its representatives: stable while the classes are."""
        return f"{self.source.key}->{self.destination.key}:{self.port}/{self.protocol}"

    @property
    def flow_key(self) -> str:
        return f"sweep:{self.cell_key}"


class SweepTable:
    """The truth table of one snapshot: source classes × (destination class, declared port)."""

    def __init__(self, snapshot: Snapshot, model: ClassModel) -> None:
        sources: dict[int, list[Pod]] = {}
        destinations: dict[int, list[Pod]] = {}
        ports: dict[int, list[tuple[int, Protocol]]] = {}
        for i, pod in enumerate(snapshot.pods):
            if not _is_running(pod) or pod.host_network or is_probe_pod(pod):
                continue
            cls = int(model.class_of[i])
            sources.setdefault(cls, []).append(pod)
            destinations.setdefault(cls, []).append(pod)
            known = ports.setdefault(cls, [])
            for cp in pod.ports:
                if (cp.port, cp.protocol) not in known:
                    known.append((cp.port, cp.protocol))
        for pods in (*sources.values(), *destinations.values()):
            pods.sort(key=lambda p: p.key)
        self._sources = [sources[c] for c in sorted(sources)]
        self._targets = [
            (destinations[c], port, protocol)
            for c in sorted(ports)
            for port, protocol in sorted(ports[c], key=lambda pp: (pp[1], pp[0]))
        ]
        self.size = len(self._sources) * len(self._targets)

    def cell(self, index: int, rng: random.Random | None = None) -> SweepCell | None:
        """Cell `index`, between its representatives (or random pods of its classes with `rng`);
        None when its only source and destination are the same pod (a pod reaches itself)."""
        sources = self._sources[index // len(self._targets)]
        destinations, port, protocol = self._targets[index % len(self._targets)]
        if rng is not None:
            source, destination = rng.choice(sources), rng.choice(destinations)
        else:
            source, destination = sources[0], destinations[0]
        if source.key == destination.key:
            others = [p for p in destinations if p.key != source.key]
            if not others:
                others = [p for p in sources if p.key != destination.key]
                if not others:
                    return None
                source = others[0]
            else:
                destination = others[0]
        return SweepCell(index, source, destination, port, protocol, rng is not None)


class SweepOrder:
    """A full-period walk over `size` cells: index i -> (a*i + c) mod size, a coprime to size."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        rng = random.Random(seed)
        self._c = rng.randrange(size) if size else 0
        a = rng.randrange(1, max(size, 2)) | 1
        while size and math.gcd(a, size) != 1:
            a += 1
        self._a = a
        self.position = 0

    def next(self) -> int:
        index = (self._a * self.position + self._c) % self.size
        self.position = (self.position + 1) % self.size
        return index


__all__ = ["SWEEP_EXPECTATION", "SweepCell", "SweepOrder", "SweepTable"]
