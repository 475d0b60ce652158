"""Errors of the lab.

    FlowproofError (flowproof.errors)
    ├── InputError               bad manifests, labels or flags (exit 2); nothing was changed
    └── LabError                 the lab cannot do what was asked (exit 1)
        ├── LabExistsError       `up` on a lab that is already there
        ├── NoSuchLabError       a command for a lab that is not there
        └── CommandError         a system command (ip, nft, sysctl) failed

Probe failures are never errors: probing returns outcomes. Always chain the cause.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowproof.errors import FlowproofError


class LabError(FlowproofError):
    """The lab cannot do what was asked; the message says what and what to do."""


class LabExistsError(LabError):
    """`lab up` found a lab of that name already in the state directory."""


class NoSuchLabError(LabError):
    """No lab of that name in the state directory."""


class CommandError(LabError):
    """A system command failed: names the command, its exit code and what it printed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        text = " ".join(self.argv)
        super().__init__(f"`{text}` exited {returncode}: {self.stderr or '(no output)'}")
