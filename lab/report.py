"""What a lab command did, for the user: one `ChangeReport` per change.

Owns the report's fields and how they read as lines. Plain data: it never looks at the state or
the system.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChangeReport:
    """What a command did, for the user."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generation: int = 0
    enforced_generation: int = 0
    enforced_pods: int = 0
    due_in_seconds: float | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = []
        for title, items in (
            ("created", self.created),
            ("deleted", self.deleted),
            ("updated", self.updated),
            ("restarted", self.restarted),
            ("policies", self.policies),
        ):
            if items:
                out.append(f"{title}: " + ", ".join(items))
        out += self.notes
        if self.due_in_seconds is not None:
            out.append(
                f"enforcement generation {self.generation}: due in {self.due_in_seconds:.1f}s "
                f"(lag fault); the kernel enforces generation {self.enforced_generation}"
            )
        else:
            out.append(
                f"enforcement generation {self.generation} "
                f"({self.enforced_pods} pod table{'s' if self.enforced_pods != 1 else ''} "
                f"updated, {self.seconds:.2f}s)"
            )
        return out
