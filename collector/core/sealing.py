"""Seals on assignments: a MAC over what the collector issued, when, and to which node.

Owns `AssignmentSeal`: `seal(assignment, issued_at)` gives the MAC the dispatcher attaches to an
assignment (the agent echoes it in the result untouched) and `verify` checks one, so a result for
an assignment the collector never issued, issued to another node, or changed on the way (another
flow, another attempt) is told apart from a real one, also by a collector restarted with the same
key. The MAC covers a canonical encoding of every field of the assignment and the issue time in
nanoseconds. Pure: the key comes from the caller (collector/ledger.py keeps it).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from flowproof.probes import Assignment, PodRef

KEY_BYTES = 32


def _pod(pod: PodRef | None) -> list[str] | None:
    return None if pod is None else [pod.uid, pod.namespace, pod.name]


def canonical(assignment: Assignment, issued_at_ns: int) -> bytes:
    """Every field of `assignment`, and the issue time, in one unambiguous byte string.

    The timeout is taken in whole nanoseconds: what survives the trip through the contract's
    Duration exactly.
    """
    a = assignment
    fields = [
        1,  # the encoding's version
        a.id,
        _pod(a.source),
        a.source_node,
        str(a.source_kind),
        _pod(a.destination),
        a.destination_ip,
        a.port,
        a.protocol,
        str(a.kind),
        round(a.timeout_seconds * 1e9),
        a.http_path,
        a.http_host,
        a.dns_query_name,
        None if a.responder is None else [_pod(a.responder.pod), a.responder.node],
        a.attempt,
        a.flow_key,
        issued_at_ns,
    ]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


class AssignmentSeal:
    """Seals and checks assignments with one secret key (KEY_BYTES random bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("an assignment key needs at least 16 bytes")
        self._key = key

    def seal(self, assignment: Assignment, issued_at_ns: int) -> bytes:
        return hmac.new(self._key, canonical(assignment, issued_at_ns), hashlib.sha256).digest()

    def verify(self, assignment: Assignment, issued_at_ns: int, mac: bytes) -> bool:
        return hmac.compare_digest(self.seal(assignment, issued_at_ns), mac)


__all__ = ["KEY_BYTES", "AssignmentSeal", "canonical"]
