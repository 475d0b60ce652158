"""The project's errors: the base every package's errors derive from, and the two shared kinds.

    FlowproofError                 anything flowproof raises on purpose
    ├── InputError                 bad user input: a manifest, an expectation, a flag (exit code 2)
    ├── ConfigurationError         a setting that cannot work (bad flag value, unreadable file)
    ├── AgentError                 the agent's own (agent/errors.py)
    ├── LabError                   the lab's own (lab/errors.py)
    └── KubeApiError               a Kubernetes API call that failed (collector/kube.py)

Failures of probes are results, never exceptions (DESIGN.md); these are for bad input and broken
infrastructure only. Always chain the cause (`raise InputError(...) from exc`).
"""

from __future__ import annotations

MAX_REASON_CHARS = 400
"""A reason, field or file longer than this is cut in the middle: input never floods a message."""
MAX_PROBLEMS_SHOWN = 100
"""An error with more problems renders the first ones and says how many more there are (all are
kept in `problems`)."""


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text`, or its start and end around `… (N characters) …` when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 20, 1)
    return f"{text[:keep]}… ({len(text)} characters) …{text[-keep:]}"


def shown(value: object, limit: int = 60) -> str:
    """The repr of a value from the input for a message, bounded (never the whole input)."""
    return bounded(repr(value), limit)


class FlowproofError(Exception):
    """Base of every error flowproof raises on purpose."""


class InputError(FlowproofError):
    """Bad input, named by where it is: file, line or document, field, and the reason.

    `str()` gives one line a user can act on: ``shop.yaml:12: spec.ingress[0].ports[0].port: 'http_'
    is not a valid IANA service name``. Several problems found in one read are kept in `problems` so
    a user can fix them all in one go; nothing is evaluated while any remain.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        line: int | None = None,
        document: int | None = None,
        field: str | None = None,
        problems: tuple[InputError, ...] = (),
    ) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        self.document = document
        self.field = field
        self.problems = problems
        super().__init__(self.render())

    def where(self) -> str:
        place = bounded(self.file or "<input>")
        if self.line is not None:
            place += f":{self.line}"
        elif self.document is not None:
            place += f" (document {self.document})"
        return place

    def render(self) -> str:
        if self.problems:
            lines = [p.render() for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                lines.append(f"… and {len(self.problems) - MAX_PROBLEMS_SHOWN} more problems")
            return "\n".join(lines)
        text = self.where() + ": "
        if self.field:
            text += f"{bounded(self.field)}: "
        return text + bounded(self.reason)


class ConfigurationError(FlowproofError):
    """A setting that cannot work; names the flag or variable and why."""
