"""Errors of the agent.

    FlowproofError (flowproof.errors)
    ├── ConfigurationError         a setting that cannot work (bad flag, unreadable token): exit 2
    └── AgentError                 anything else the agent raises on purpose
        ├── NamespaceError             a pod's network namespace cannot be entered
        │   └── PodNotFound        no process of the pod runs on this node (gone, or elsewhere)
        └── NetnsThreadBroken      the socket helper thread could not return to its namespace:
                                   the agent stops, as sockets made there would be misplaced

A probe that fails is a result (`Outcome.ERROR` with the reason), never an exception;
`NamespaceError` becomes such a result at the probing edge. Always chain the cause.
"""

from __future__ import annotations

from flowproof.errors import FlowproofError


class AgentError(FlowproofError):
    """Base of the agent's own errors (settings errors are flowproof.errors.ConfigurationError)."""


class NamespaceError(AgentError):
    """A pod's network namespace cannot be found or entered."""


class PodNotFound(NamespaceError):
    """No running process of the pod on this node: it is gone, not started yet, or elsewhere."""


class NetnsThreadBroken(AgentError):
    """The helper thread failed to return to its own network namespace; fatal for the agent."""
