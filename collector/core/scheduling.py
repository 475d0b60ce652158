"""The scheduler: which assignments of the current plan are due, in which order, at what rate.

Owns `Planner`: retries at once, touched flows first after a change (and once more when the change
has settled), then a steady cadence with jitter per flow, bounded per source node and per
destination; lost assignments are redone; and the sweep's rotation: every cadence interval the next
batch of truth-table cells replaces the last (cells that fail stay until they pass). Pure: no I/O,
no clock of its own (`now` is passed in), no grpc, aiohttp or protobuf.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from collector.core.changes import ChangeEvent, FlowFacts, touched_flows
from collector.core.model import Snapshot
from collector.core.planning import Plan, PlannedFlow, build_plan, sweep_flow, update_plan
from collector.core.settings import PlannerSettings
from collector.core.sweeping import SweepCell, SweepOrder
from flowproof.probes import Assignment


@dataclass(frozen=True)
class PlanUpdate:
    """What `Planner.update` changed: the new plan and which flow keys appeared, went or were
    touched (to be verified first; the feedback latency is measured on these)."""

    plan: Plan
    change: ChangeEvent | None
    added: frozenset[str]
    removed: frozenset[str]
    touched: frozenset[str]


@dataclass(frozen=True)
class PreparedPlan:
    """A plan built from a snapshot, with its flows' facts: the pure, slow half of an update,
    which may be built in another thread (it reads only the snapshot, the settings and, for an
    update, the plan before)."""

    plan: Plan
    facts: dict[str, FlowFacts]


def prepare_plan(snapshot: Snapshot, settings: PlannerSettings, *, generation: int) -> PreparedPlan:
    """`build_plan` and the facts `Planner.apply` compares; touches no planner state."""
    plan = build_plan(snapshot, settings, generation=generation)
    return PreparedPlan(plan, plan.facts())


def prepare_update(
    previous: PreparedPlan,
    snapshot: Snapshot,
    change: ChangeEvent,
    settings: PlannerSettings,
    *,
    generation: int,
) -> PreparedPlan | None:
    """`update_plan` from the plan prepared before, with facts computed only for the flows it
    made anew (a kept flow keeps its facts); None when the plan must be built whole."""
    plan = update_plan(previous.plan, snapshot, change, settings, generation=generation)
    if plan is None:
        return None
    before = previous.plan.flows
    facts = {
        key: previous.facts[key] if before.get(key) is flow else flow.facts()
        for key, flow in plan.flows.items()
    }
    return PreparedPlan(plan, facts)


class _TokenBucket:
    """`rate` per second with a burst of one second's worth (at least one)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.updated = now

    def ready(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


@dataclass
class _InFlight:
    key: str
    issued_at: float
    deadline: float


@dataclass
class PlannerStats:
    issued_total: int = 0
    retries_total: int = 0
    lost_total: int = 0
    rate_limited_total: int = 0


URGENT_RETRY, URGENT_DECLARED, URGENT_UNDECLARED = 0, 1, 2


@dataclass(order=True)
class _Urgent:
    priority: int
    sequence: int
    key: str = field(compare=False)
    attempt: int = field(compare=False, default=1)


class Planner:
    """Holds the current plan and decides which assignments are due.

    Order: retries first, then flows touched by a change (declared before witnesses and sweep
    cells), then the cadence (`interval_seconds` ± jitter per flow, earliest first). A touched
    flow's first probe is followed by one more `settle_seconds` later, then the cadence goes on. A
    flow with a probe in flight is not
    sent again by the cadence; retries and touched flows are (the probe in flight may predate the
    change). Nothing is sent beyond `max_per_node_per_second` or `max_per_destination_per_second`:
    what is held back stays queued in its place.
    """

    def __init__(
        self,
        settings: PlannerSettings,
        *,
        seed: int | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.settings = settings
        self._rng = random.Random(seed)
        self._id_prefix = id_prefix if id_prefix is not None else uuid.uuid4().hex[:12]
        self._sequence = 0
        self.plan = Plan(generation=0, flows={}, declared=())
        self._facts: dict[str, FlowFacts] = {}
        self._next_due: dict[str, float] = {}
        self._cadence: list[tuple[float, int, str]] = []
        self._urgent: list[_Urgent] = []
        self._urgent_keys: dict[str, _Urgent] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._deadlines: list[tuple[float, str]] = []  # (deadline, id), answered ones popped late
        self._keys_in_flight: dict[str, int] = defaultdict(int)
        self._lost: list[str] = []  # given up on since the last take_lost()
        self._settling: set[str] = set()  # touched by a change, its first probe not sent yet
        self._settle_at: dict[str, float] = {}  # first probe sent: once more at this time
        self._nodes: dict[str, _TokenBucket] = {}
        self._destinations: dict[str, _TokenBucket] = {}
        self.stats = PlannerStats()
        self._sweep_cells: dict[str, SweepCell] = {}
        self._sweep_order: SweepOrder | None = None
        self._sweep_rng = random.Random(settings.sweep_seed)
        self._next_rotation = -math.inf

    # -- plan --------------------------------------------------------------------------------------

    def update(self, snapshot: Snapshot, change: ChangeEvent | None, now: float) -> PlanUpdate:
        """Plan a new snapshot; keep the schedule of unchanged flows, queue the touched ones."""
        generation = change.generation if change is not None else self.plan.generation + 1
        return self.apply(prepare_plan(snapshot, self.settings, generation=generation), change, now)

    def apply(self, prepared: PreparedPlan, change: ChangeEvent | None, now: float) -> PlanUpdate:
        """`update` with the plan already built (`prepare_plan`, possibly in another thread); the
        sweep's batch is carried over here, on the planner's side."""
        plan = self._with_sweep(prepared.plan)
        facts = dict(prepared.facts)
        for key, flow in plan.flows.items():
            if prepared.plan.flows.get(key) is not flow:  # a sweep cell carried over
                facts[key] = flow.facts()
        touched = set(touched_flows(change, self._facts, facts))
        added = facts.keys() - self._facts.keys()
        removed = self._facts.keys() - facts.keys()
        # A sweep cell is there because the sweep reached it, not because the change touched it.
        touched -= {k for k in added if plan.flows[k].kind == "sweep"}
        # Not on the first plan: nothing there was enforced before, and nothing has to settle.
        settle = self.settings.settle_seconds > 0 and bool(self._facts)
        self.plan = plan
        self._facts = facts
        for key in removed:
            self._next_due.pop(key, None)
            self._urgent_keys.pop(key, None)
            self._settling.discard(key)
            self._settle_at.pop(key, None)
        for key in sorted(added - touched):
            self._schedule(key, now + self._rng.uniform(0, self.settings.interval_seconds))
        for key in sorted(touched):
            flow = plan.flows[key]
            if flow.template is None:
                self._next_due.pop(key, None)
                continue
            self._push_urgent(
                key, URGENT_DECLARED if flow.kind == "declared" else URGENT_UNDECLARED
            )
            if settle:
                self._settling.add(key)
                self._settle_at.pop(key, None)
            if key not in self._next_due:
                self._schedule(key, now + self._interval())
        live_nodes = {f.template.source_node for f in plan.flows.values() if f.template}
        live_destinations = {f.template.destination_ip for f in plan.flows.values() if f.template}
        self._nodes = {n: b for n, b in self._nodes.items() if n in live_nodes}
        self._destinations = {d: b for d, b in self._destinations.items() if d in live_destinations}
        return PlanUpdate(
            plan=plan,
            change=change,
            added=frozenset(added),
            removed=frozenset(removed),
            touched=frozenset(touched),
        )

    def _with_sweep(self, plan: Plan) -> Plan:
        """`plan` with the sweep's current batch carried over (re-judged on the new snapshot)."""
        table = plan.sweep
        if (
            table is None
            or plan.engine is None
            or not table.size
            or self.settings.sweep_probes_per_second <= 0
        ):
            self._sweep_cells.clear()
            self._sweep_order = None
            return plan
        if self._sweep_order is None or self._sweep_order.size != table.size:
            position = self._sweep_order.position if self._sweep_order is not None else 0
            self._sweep_order = SweepOrder(table.size, self.settings.sweep_seed)
            self._sweep_order.position = position % table.size
        pods = plan.engine.snapshot.pods_by_key
        kept: dict[str, PlannedFlow] = {}
        for key, cell in list(self._sweep_cells.items()):
            source, destination = pods.get(cell.source.key), pods.get(cell.destination.key)
            if source is None or destination is None:
                del self._sweep_cells[key]
                continue
            cell = dataclasses.replace(cell, source=source, destination=destination)
            self._sweep_cells[key] = cell
            kept[key] = sweep_flow(cell, plan.engine, self.settings)
        return dataclasses.replace(plan, flows={**plan.flows, **kept})

    def sweep_due(self, now: float) -> bool:
        """Whether the sweep's next batch is due (`rotate_sweep`)."""
        return self._sweep_order is not None and now >= self._next_rotation

    def rotate_sweep(self, now: float, keep: Iterable[str] = ()) -> PlanUpdate | None:
        """Every cadence interval: the next batch of truth-table cells replaces the last, except
        the ones in `keep` (the flow state's failing or confirming cells). None when not due."""
        settings = self.settings
        plan = self.plan
        table, engine, order = plan.sweep, plan.engine, self._sweep_order
        if now < self._next_rotation or table is None or engine is None or order is None:
            return None
        self._next_rotation = now + settings.interval_seconds
        batch = round(settings.sweep_probes_per_second * settings.interval_seconds)
        keep = set(keep)
        removed = {k for k in self._sweep_cells if k not in keep}
        cells: dict[str, SweepCell] = {}
        randoms = round(batch * settings.sweep_random_fraction)
        for _ in range(min(batch - randoms, table.size)):
            cell = table.cell(order.next())
            if cell is not None:
                cells.setdefault(cell.flow_key, cell)
        for _ in range(randoms):
            cell = table.cell(self._sweep_rng.randrange(table.size), self._sweep_rng)
            if cell is not None:
                cells.setdefault(cell.flow_key, cell)
        removed -= cells.keys()
        flows = {k: f for k, f in plan.flows.items() if k not in removed}
        added: set[str] = set()
        pods = engine.snapshot.pods_by_key
        for key, cell in cells.items():
            if key in flows or key in plan.flows:
                continue
            # A table carried over from an earlier snapshot (`Plan.basis`) holds its pods: the
            # cell is judged between the pods as they are now, and left out when one is gone.
            source, destination = pods.get(cell.source.key), pods.get(cell.destination.key)
            if source is None or destination is None:
                continue
            if source is not cell.source or destination is not cell.destination:
                cell = dataclasses.replace(cell, source=source, destination=destination)
            self._sweep_cells[key] = cell
            flows[key] = flow = sweep_flow(cell, engine, settings)
            self._facts[key] = flow.facts()
            self._schedule(key, now + self._rng.uniform(0, settings.interval_seconds))
            added.add(key)
        for key in removed:
            self._sweep_cells.pop(key, None)
            self._facts.pop(key, None)
            self._next_due.pop(key, None)
            self._urgent_keys.pop(key, None)
        self.plan = dataclasses.replace(plan, flows=flows)
        return PlanUpdate(
            plan=self.plan,
            change=None,
            added=frozenset(added),
            removed=frozenset(removed),
            touched=frozenset(),
        )

    def expedite(
        self, keys: Iterable[str] | None = None, *, kinds: Iterable[str] = ("declared",)
    ) -> int:
        """Verify these flows (default: every flow of `kinds`) now, before the cadence; returns
        how many were queued. `verify` uses it to run every expectation at once."""
        wanted = set(kinds)
        chosen = (
            [k for k, f in self.plan.flows.items() if f.kind in wanted]
            if keys is None
            else list(keys)
        )
        queued = 0
        for key in chosen:
            flow = self.plan.flows.get(key)
            if flow is None or flow.template is None:
                continue
            self._push_urgent(
                key, URGENT_DECLARED if flow.kind == "declared" else URGENT_UNDECLARED
            )
            queued += 1
        return queued

    def retry(self, key: str, *, attempt: int) -> None:
        """Probe `key` again at once (a result that would fail the flow is confirmed first)."""
        if key in self.plan.flows:
            self._push_urgent(key, URGENT_RETRY, attempt)

    def completed(self, assignment_id: str) -> str | None:
        """A result for `assignment_id` came: its flow is no longer in flight; returns its key."""
        entry = self._in_flight.pop(assignment_id, None)
        if entry is None:
            return None
        self._release(entry.key)
        return entry.key

    def take_lost(self) -> list[str]:
        """The assignments given up on (past their deadline, redone under a new id) since the
        last call: the dispatcher must forget them, or one whose node has no agent (or a queue
        that never drains) would be kept and sent late, without bound."""
        lost, self._lost = self._lost, []
        return lost

    # -- due ---------------------------------------------------------------------------------------

    def due(self, now: float) -> list[Assignment]:
        """The assignments to send now, in order; what rate limits hold back stays queued."""
        self._expire(now)
        issued: list[Assignment] = []
        held: list[_Urgent] = []
        while self._urgent:
            item = heapq.heappop(self._urgent)
            if self._urgent_keys.get(item.key) is not item:
                continue  # superseded by a more urgent entry, or the flow went away
            flow = self.plan.flows.get(item.key)
            if flow is None or flow.template is None:
                del self._urgent_keys[item.key]
                continue
            if not self._admit(flow.template, now):
                held.append(item)
                continue
            del self._urgent_keys[item.key]
            if item.priority == URGENT_RETRY:
                self.stats.retries_total += 1
            issued.append(self._issue(flow.template, now, item.attempt))
        for item in held:
            heapq.heappush(self._urgent, item)
        issued += self._settled(now)
        later: list[tuple[float, int, str]] = []
        while self._cadence and self._cadence[0][0] <= now:
            entry = heapq.heappop(self._cadence)
            due_at, _, key = entry
            if self._next_due.get(key) != due_at:
                continue  # rescheduled since
            flow = self.plan.flows.get(key)
            if flow is None or flow.template is None:
                self._next_due.pop(key, None)
                continue
            if self._keys_in_flight.get(key) or key in self._urgent_keys:
                self._schedule(key, now + self._interval())
                continue
            if not self._admit(flow.template, now):
                later.append(entry)
                continue
            issued.append(self._issue(flow.template, now, 1))
        for entry in later:
            heapq.heappush(self._cadence, entry)
        return issued

    def _settled(self, now: float) -> list[Assignment]:
        """The probes of touched flows whose change has settled, once nothing of theirs is in
        flight (a retry that confirms a mismatch goes first)."""
        issued = []
        for key, at in sorted(self._settle_at.items(), key=lambda item: item[1]):
            if at > now:
                break
            if self._keys_in_flight.get(key) or key in self._urgent_keys:
                continue
            flow = self.plan.flows.get(key)
            if flow is None or flow.template is None:
                del self._settle_at[key]
                continue
            if not self._admit(flow.template, now):
                continue
            del self._settle_at[key]
            issued.append(self._issue(flow.template, now, 1))
        return issued

    def settling(self, key: str) -> bool:
        """Does `key` wait for its probe after a change has settled (then a result of it may
        let that probe go: wake the sender)?"""
        return key in self._settle_at

    def next_wakeup(self, now: float) -> float | None:
        """When `due` may next return something (now if anything urgent is queued)."""
        if self._urgent_keys or self.sweep_due(now):
            return now
        ready = [
            at
            for key, at in self._settle_at.items()
            if not self._keys_in_flight.get(key) and key not in self._urgent_keys
        ]
        if ready:
            cadence = self._next_cadence()
            return min(min(ready), cadence if cadence is not None else math.inf)
        return self._next_cadence()

    def _next_cadence(self) -> float | None:
        while self._cadence:
            due_at, _, key = self._cadence[0]
            if self._next_due.get(key) == due_at:
                return min(due_at, self._earliest_deadline())
            heapq.heappop(self._cadence)
        deadline = self._earliest_deadline()
        return None if deadline == math.inf else deadline

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- internals ---------------------------------------------------------------------------------

    def _interval(self) -> float:
        jitter = self.settings.jitter_fraction
        return self.settings.interval_seconds * self._rng.uniform(1 - jitter, 1 + jitter)

    def _schedule(self, key: str, at: float) -> None:
        self._sequence += 1
        self._next_due[key] = at
        heapq.heappush(self._cadence, (at, self._sequence, key))

    def _push_urgent(self, key: str, priority: int, attempt: int = 1) -> None:
        current = self._urgent_keys.get(key)
        if current is not None and current.priority <= priority:
            return
        self._sequence += 1
        item = _Urgent(priority, self._sequence, key, attempt)
        self._urgent_keys[key] = item
        heapq.heappush(self._urgent, item)

    def _bucket(
        self, buckets: dict[str, _TokenBucket], name: str, rate: float, now: float
    ) -> _TokenBucket:
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = _TokenBucket(rate, now)
        return bucket

    def _admit(self, template: Assignment, now: float) -> bool:
        node = self._bucket(
            self._nodes, template.source_node, self.settings.max_per_node_per_second, now
        )
        destination = self._bucket(
            self._destinations,
            template.destination_ip,
            self.settings.max_per_destination_per_second,
            now,
        )
        if not (node.ready(now) and destination.ready(now)):
            self.stats.rate_limited_total += 1
            return False
        node.take()
        destination.take()
        return True

    def _issue(self, template: Assignment, now: float, attempt: int) -> Assignment:
        self._sequence += 1
        assignment = dataclasses.replace(
            template, id=f"{self._id_prefix}-{self._sequence}", attempt=attempt
        )
        deadline = now + template.timeout_seconds + self.settings.result_grace_seconds
        self._in_flight[assignment.id] = _InFlight(template.flow_key, now, deadline)
        heapq.heappush(self._deadlines, (deadline, assignment.id))
        self._keys_in_flight[template.flow_key] += 1
        key = template.flow_key
        self._schedule(key, now + self._interval())
        if key in self._settling:  # the first probe since a change: again once it has settled
            self._settling.discard(key)
            self._settle_at[key] = now + self.settings.settle_seconds
        self.stats.issued_total += 1
        return assignment

    def _release(self, key: str) -> None:
        left = self._keys_in_flight.get(key, 0) - 1
        if left > 0:
            self._keys_in_flight[key] = left
        else:
            self._keys_in_flight.pop(key, None)

    def _earliest_deadline(self) -> float:
        """The first deadline of an assignment still in flight (the heap's answered tops go)."""
        while self._deadlines and self._deadlines[0][1] not in self._in_flight:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else math.inf

    def _expire(self, now: float) -> None:
        """Give up on assignments past their deadline: from the heap's top, never a scan of all
        in flight (`due` runs on every wake-up of the plan sender)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, assignment_id = heapq.heappop(self._deadlines)
            entry = self._in_flight.pop(assignment_id, None)
            if entry is None:
                continue  # answered in time
            self._release(entry.key)
            self.stats.lost_total += 1
            self._lost.append(assignment_id)
            if entry.key in self.plan.flows:
                self._schedule(entry.key, now)
