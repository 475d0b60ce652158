"""ManifestSource: manifests (files, directories, `kind: List`, kustomize output) -> Snapshot.

Owns reading YAML and JSON with line numbers, the converters from API-shaped dicts to the model
(also used by the Kubernetes source) and the validation that rejects a bad input as a whole, each
problem named by file, line, field and reason. It must never import `kubernetes` or evaluate
anything: nothing downstream ever sees a half-read input.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import logging
import os
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml: correct, several times slower
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

from collector.errors import InputError
from collector.model import (
    NAMESPACE_NAME_LABEL,
    PROTOCOLS,
    ContainerPort,
    Direction,
    Expectations,
    IPBlock,
    IPNetwork,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PodTarget,
    PolicyPort,
    Protocol,
    Requirement,
    Rule,
    Snapshot,
)

log = logging.getLogger(__name__)

FieldPath = tuple[str | int, ...]
"""A field inside an object: `("spec", "ingress", 0, "from")` renders as `spec.ingress[0].from`."""

MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
KUSTOMIZATION_FILES: Final = frozenset({"kustomization.yaml", "kustomization.yml", "Kustomization"})

# kind -> (API group, served versions) for the kinds the snapshot reads. A kind of the same name in
# another group (Calico's crd.projectcalico.org NetworkPolicy) is a different object and is ignored.
KINDS: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "Namespace": ("", ("v1",)),
    "Pod": ("", ("v1",)),
    "ReplicationController": ("", ("v1",)),
    "NetworkPolicy": ("networking.k8s.io", ("v1",)),
    "Deployment": ("apps", ("v1",)),
    "StatefulSet": ("apps", ("v1",)),
    "DaemonSet": ("apps", ("v1",)),
    "ReplicaSet": ("apps", ("v1",)),
    "Job": ("batch", ("v1",)),
    "CronJob": ("batch", ("v1",)),
    "FlowExpectations": ("flowproof.dev", ("v1alpha1",)),
}
WORKLOAD_KINDS: Final = frozenset(
    {
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "ReplicationController",
        "Job",
        "CronJob",
    }
)
_SELECTOR_REQUIRED: Final = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
_CLUSTER_SCOPED: Final = frozenset({"Namespace"})
# Groups that once served these kinds; reading such a manifest as "some other object" would silently
# drop a policy or workload, so it is an error instead.
_RETIRED_GROUPS: Final = frozenset({"extensions"})

# --- field paths and places -----------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def render_field(path: FieldPath) -> str:
    """`("spec", "ingress", 0, "from")` -> `spec.ingress[0].from`; odd keys read `x["a.b/c"]`."""
    out: list[str] = []
    for step in path:
        if isinstance(step, int):
            out.append(f"[{step}]")
        elif _PLAIN_KEY.fullmatch(step):
            out.append(f".{step}" if out else step)
        else:
            out.append(f'["{step}"]')
    return "".join(out)


def _node_line(node: yaml.Node, path: FieldPath) -> int:
    """The 1-based line of the deepest part of `path` found under `node` (a key's own line)."""
    line: int = node.start_mark.line + 1
    current: yaml.Node = node
    for step in path:
        if isinstance(current, yaml.MappingNode) and isinstance(step, str):
            # The last occurrence wins, as it does when the mapping is constructed.
            for key, value in reversed(current.value):
                if isinstance(key, yaml.ScalarNode) and key.value == step:
                    line = key.start_mark.line + 1
                    current = value
                    break
            else:
                return line
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(step, int)
            and 0 <= step < len(current.value)
        ):
            current = current.value[step]
            line = current.start_mark.line + 1
        else:
            return line
    return line


class LineFinder:
    """Finds the line of a field in one file, composing the file's YAML again when first asked.

    Keeping every node of a large input while reading it costs seconds and hundreds of MB; lines
    of fields are only needed for problems, which are few.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._roots: list[yaml.Node] | None = None

    def line(self, document: int, path: FieldPath) -> int | None:
        """The line of `path` in the `document`-th document (from 1), or None if unknown."""
        if self._roots is None:
            self._roots = []
            loader = _SafeLoader(self._data)
            try:
                while loader.check_node() and (node := loader.get_node()) is not None:
                    self._roots.append(node)
            except yaml.YAMLError:
                pass  # the read reported it; the documents before it still have lines
            finally:
                loader.dispose()
        if 1 <= document <= len(self._roots):
            return _node_line(self._roots[document - 1], path)
        return None


@dataclass(frozen=True)
class Where:
    """Where an object was read, so that a problem can name its file, line (or document) and field.

    For files, `document` counts from 1, `start_line` is the object's first line and `lines` finds
    the line of any field; `prefix` is the object's own path in its document (`items[3]` of a
    List). For objects from the API, `file` names the object (`api:namespaces/x/pods/y`) and
    there are no lines.
    """

    file: str
    document: int | None = None
    start_line: int | None = None
    prefix: FieldPath = ()
    lines: LineFinder | None = field(default=None, compare=False, repr=False)

    def line(self, path: FieldPath = ()) -> int | None:
        """The line of the field at `path` (or its nearest present ancestor), if lines are known."""
        if path and self.lines is not None and self.document is not None:
            found = self.lines.line(self.document, self.prefix + path)
            if found is not None:
                return found
        return self.start_line

    def error(self, path: FieldPath, reason: str) -> InputError:
        return InputError(
            reason,
            file=self.file,
            line=self.line(path),
            document=self.document,
            field=render_field(self.prefix + path) or None,
        )

    @property
    def source(self) -> str:
        """`file:line` of the object itself, for messages and `NetworkPolicy.source`."""
        if self.start_line is not None:
            return f"{self.file}:{self.start_line}"
        if self.document is not None:
            return f"{self.file} (document {self.document})"
        return self.file


def raise_problems(problems: Sequence[InputError], files: Sequence[str] = ()) -> None:
    """Raise one InputError carrying every problem found, if there is any.

    Problems are sorted by file (in the order of `files`, then of first mention) and then top
    to bottom: the order a user fixes them in.
    """
    if problems:
        flat = [p for problem in problems for p in (problem.problems or (problem,))]
        order: dict[str | None, int] = {file: i for i, file in enumerate(files)}
        for problem in flat:
            order.setdefault(problem.file, len(order))
        flat.sort(key=lambda p: (order[p.file], p.document or 0, p.line or 0, p.field or ""))
        count = f"{len(flat)} problem" + ("s" if len(flat) != 1 else "")
        raise InputError(f"{count} in the input; nothing was evaluated", problems=tuple(flat))


# --- the problem-collecting reader ----------------------------------------------------------------


def describe_type(value: object) -> str:
    """How a YAML value reads to a user: `a list`, `a string`, `a number`, `true/false`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def close_spelling(name: str, known: Collection[str]) -> str | None:
    """The known field `name` is most likely a misspelling of, if any."""
    by_lower = {k.lower(): k for k in known}
    return by_lower.get(name.lower()) or next(
        iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)), None
    )


def unknown_field_reason(name: str, known: Collection[str], hint: str | None = None) -> str:
    """`unknown field 'podselector' (did you mean 'podSelector'?)`, or the known fields."""
    reason = f"unknown field {name!r}"
    close = close_spelling(name, known)
    if close is not None:
        return f"{reason} (did you mean {close!r}?)"
    if hint is not None:
        return f"{reason} ({hint})"
    return f"{reason}; known fields: {', '.join(sorted(known))}"


class Reader:
    """Converts one object while collecting its problems; conversion goes on after a problem.

    Every accessor returns a harmless default (empty mapping, None) for a value of the wrong type
    after recording why, so a single read reports every problem of an input.
    """

    __slots__ = ("problems", "where")

    def __init__(self, where: Where, problems: list[InputError] | None = None) -> None:
        self.where = where
        self.problems: list[InputError] = [] if problems is None else problems

    def problem(self, path: FieldPath, reason: str) -> None:
        self.problems.append(self.where.error(path, reason))

    def mapping(
        self,
        value: object,
        path: FieldPath,
        fields: Collection[str] | None = None,
        hints: Mapping[str, str] | None = None,
    ) -> Mapping[str, Any]:
        """A mapping (None reads as empty); with `fields`, any other key is an unknown field."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path, f"must be a mapping, not {describe_type(value)}")
            return {}
        if fields is not None:
            for key in value:
                if key not in fields:
                    hint = hints.get(str(key)) if hints else None
                    self.problem((*path, str(key)), unknown_field_reason(str(key), fields, hint))
        return value

    def sequence(self, value: object, path: FieldPath) -> Sequence[Any]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(path, f"must be a list, not {describe_type(value)}")
            return ()
        return value

    def string(self, value: object, path: FieldPath) -> str | None:
        if value is None or isinstance(value, str):
            return value
        self.problem(path, f"must be a string, not {describe_type(value)}")
        return None

    def integer(self, value: object, path: FieldPath) -> int | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        self.problem(path, f"must be an integer, not {describe_type(value)}")
        return None

    def boolean(self, value: object, path: FieldPath) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        self.problem(path, f"must be true or false, not {describe_type(value)}")
        return None

    def required_string(self, value: object, path: FieldPath) -> str | None:
        if value is None or value == "":
            self.problem(path, "required field is missing")
            return None
        return self.string(value, path)


# --- Kubernetes syntax (k8s.io/apimachinery/pkg/util/validation) ----------------------------------

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")
_LABEL_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)
_DNS1123_LABEL_RULE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (at most 63 characters)"
)
_DNS1123_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (at most 253 characters)"
)


@functools.lru_cache(maxsize=8192)
def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label key (optional DNS-1123 subdomain prefix + '/' + name)."""
    parts = key.split("/")
    if len(parts) > 2:
        return f"invalid label key {key!r}: at most one '/' (prefix/name)"
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return f"invalid label key {key!r}: the prefix before '/' must be non-empty"
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            return f"invalid label key {key!r}: prefix {_DNS1123_SUBDOMAIN_RULE}"
    if not name:
        return f"invalid label key {key!r}: the name part must be non-empty"
    if len(name) > 63:
        return f"invalid label key {key!r}: the name part must be no more than 63 characters"
    if not _LABEL_NAME.fullmatch(name):
        return f"invalid label key {key!r}: the name part {_LABEL_NAME_RULE}"
    return None


@functools.lru_cache(maxsize=8192)
def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value (empty, or a name of at most 63 characters)."""
    if len(value) > 63:
        return f"invalid label value {value!r}: must be no more than 63 characters"
    if value and not _LABEL_NAME.fullmatch(value):
        return f"invalid label value {value!r}: must be empty or {_LABEL_NAME_RULE[5:]}"
    return None


@functools.lru_cache(maxsize=4096)
def port_name_problem(name: str) -> str | None:
    """Why `name` is not a valid IANA service name (what a named port must be)."""
    rule: str | None = None
    if len(name) > 15:
        rule = "must be no more than 15 characters"
    elif not _PORT_NAME_CHARS.fullmatch(name):
        rule = "must contain only lowercase letters (a-z), digits (0-9) and hyphens (-)"
    elif "--" in name:
        rule = "must not contain consecutive hyphens"
    elif not any("a" <= c <= "z" for c in name):
        rule = "must contain at least one letter (a-z)"
    elif name.startswith("-") or name.endswith("-"):
        rule = "must not begin or end with a hyphen"
    return None if rule is None else f"{name!r} is not a valid IANA service name: {rule}"


def port_number_problem(number: int) -> str | None:
    if 1 <= number <= 65535:
        return None
    return f"{number} is not a valid port number: must be between 1 and 65535, inclusive"


@functools.lru_cache(maxsize=4096)
def dns_label_problem(name: str) -> str | None:
    if len(name) <= 63 and _DNS1123_LABEL.fullmatch(name):
        return None
    return f"{name!r} is not a valid name: {_DNS1123_LABEL_RULE}"


@functools.lru_cache(maxsize=16384)
def dns_subdomain_problem(name: str) -> str | None:
    if len(name) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(name):
        return None
    return f"{name!r} is not a valid name: {_DNS1123_SUBDOMAIN_RULE}"


_CIDR_SHAPE = re.compile(r"[^/\s]+/[0-9]{1,3}")


def parse_cidr(text: str) -> tuple[IPNetwork | None, str | None]:
    """(network, None) if valid, else (None, why); host bits set are an error, as in the API."""
    bad = f"{text!r} is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)"
    if not _CIDR_SHAPE.fullmatch(text):
        return None, bad
    try:
        return ipaddress.ip_network(text, strict=True), None
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None, bad
    return None, f"{text!r} has host bits set: did you mean {network}?"


# --- selectors, labels, ports ---------------------------------------------------------------------

_SELECTOR_FIELDS: Final = ("matchLabels", "matchExpressions")
_REQUIREMENT_FIELDS: Final = ("key", "operator", "values")
_OPERATORS: Final[tuple[Operator, ...]] = ("In", "NotIn", "Exists", "DoesNotExist")


def read_labels(r: Reader, value: object, path: FieldPath) -> dict[str, str]:
    """A label map (metadata.labels, matchLabels): valid keys to valid string values."""
    labels: dict[str, str] = {}
    for key, item in r.mapping(value, path).items():
        here = (*path, str(key))
        if not isinstance(key, str):
            r.problem(here, f"label keys must be strings, not {describe_type(key)}")
            continue
        problem = label_key_problem(key)
        if problem is not None:
            r.problem(here, problem)
            continue
        if item is None:
            item = ""  # `app:` reads as null, which the API decodes as the empty string
        if not isinstance(item, str):
            r.problem(
                here,
                f"label values must be strings, not {describe_type(item)} (quote it: '{item}')",
            )
            continue
        problem = label_value_problem(item)
        if problem is not None:
            r.problem(here, problem)
            continue
        labels[key] = item
    return labels


def read_selector(r: Reader, value: object, path: FieldPath) -> LabelSelector:
    """A metav1.LabelSelector; absent or `{}` is the empty selector (everything)."""
    obj = r.mapping(value, path, _SELECTOR_FIELDS)
    labels = read_labels(r, obj.get("matchLabels"), (*path, "matchLabels"))
    requirements: list[Requirement] = []
    exprs_path = (*path, "matchExpressions")
    for i, raw in enumerate(r.sequence(obj.get("matchExpressions"), exprs_path)):
        here = (*exprs_path, i)
        expr = r.mapping(raw, here, _REQUIREMENT_FIELDS)
        if not expr:
            if isinstance(raw, Mapping):
                r.problem((*here, "key"), "required field is missing")
            continue
        key = r.required_string(expr.get("key"), (*here, "key"))
        if key is not None and (problem := label_key_problem(key)) is not None:
            r.problem((*here, "key"), problem)
        raw_operator = r.required_string(expr.get("operator"), (*here, "operator"))
        operator = next((op for op in _OPERATORS if op == raw_operator), None)
        if raw_operator is not None and operator is None:
            r.problem((*here, "operator"), _unsupported(raw_operator, _OPERATORS))
        values: list[str] = []
        for j, item in enumerate(r.sequence(expr.get("values"), (*here, "values"))):
            if not isinstance(item, str):
                r.problem(
                    (*here, "values", j),
                    f"values must be strings, not {describe_type(item)} (quote it: '{item}')",
                )
            elif (problem := label_value_problem(item)) is not None:
                r.problem((*here, "values", j), problem)
            else:
                values.append(item)
        if any(k not in _REQUIREMENT_FIELDS for k in expr):
            pass  # a misspelt `values` is reported as such, not as missing values
        elif operator in ("In", "NotIn") and not expr.get("values"):
            r.problem((*here, "values"), f"must be non-empty when operator is {operator!r}")
        elif operator in ("Exists", "DoesNotExist") and expr.get("values"):
            r.problem((*here, "values"), f"must be empty when operator is {operator!r}")
        if key is not None and operator is not None:
            requirements.append(Requirement(key, operator, tuple(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(requirements))


def _unsupported(value: object, supported: Iterable[str]) -> str:
    return f"unsupported value {value!r}: supported values: " + ", ".join(
        repr(s) for s in supported
    )


def read_protocol(r: Reader, value: object, path: FieldPath) -> Protocol:
    """A protocol; absent means TCP, anything but TCP, UDP or SCTP is an error (case matters)."""
    text = r.string(value, path)
    if text is None:
        return "TCP"
    for protocol in PROTOCOLS:
        if text == protocol:
            return protocol
    r.problem(path, _unsupported(text, PROTOCOLS))
    return "TCP"


# --- NetworkPolicy --------------------------------------------------------------------------------

_POLICY_FIELDS: Final = ("apiVersion", "kind", "metadata", "spec", "status")
_POLICY_SPEC_FIELDS: Final = ("podSelector", "policyTypes", "ingress", "egress")
_INGRESS_RULE_FIELDS: Final = ("from", "ports")
_EGRESS_RULE_FIELDS: Final = ("to", "ports")
_PEER_FIELDS: Final = ("podSelector", "namespaceSelector", "ipBlock")
_IPBLOCK_FIELDS: Final = ("cidr", "except")
_POLICY_PORT_FIELDS: Final = ("protocol", "port", "endPort")
_POLICY_TYPES: Final[Mapping[str, Direction]] = {"Ingress": "ingress", "Egress": "egress"}
_RULE_HINTS: Final[Mapping[str, Mapping[str, str]]] = {
    "ingress": {"to": "ingress rules name their sources in 'from'"},
    "egress": {"from": "egress rules name their destinations in 'to'"},
}


def _metadata(
    r: Reader, obj: Mapping[str, Any], *, namespaced: bool = True
) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, metadata); a missing namespace is `default`, as kubectl applies it."""
    meta = r.mapping(obj.get("metadata"), ("metadata",))
    name = r.required_string(meta.get("name"), ("metadata", "name")) or ""
    namespace = ""
    if namespaced:
        namespace = r.string(meta.get("namespace"), ("metadata", "namespace")) or "default"
        if (problem := dns_label_problem(namespace)) is not None:
            r.problem(("metadata", "namespace"), problem)
    return namespace, name, meta


def _check_name(r: Reader, name: str, *, label: bool = False) -> None:
    if name:
        problem = dns_label_problem(name) if label else dns_subdomain_problem(name)
        if problem is not None:
            r.problem(("metadata", "name"), problem)


def _read_policy(r: Reader, obj: Mapping[str, Any]) -> NetworkPolicy:
    r.mapping(obj, (), _POLICY_FIELDS)
    namespace, name, _ = _metadata(r, obj)
    _check_name(r, name)
    spec = r.mapping(obj.get("spec"), ("spec",), _POLICY_SPEC_FIELDS)
    pod_selector = read_selector(r, spec.get("podSelector"), ("spec", "podSelector"))

    ingress = _read_rules(r, spec.get("ingress"), "ingress")
    egress = _read_rules(r, spec.get("egress"), "egress")

    given: set[Direction] = set()
    types_path: FieldPath = ("spec", "policyTypes")
    raw_types = r.sequence(spec.get("policyTypes"), types_path)
    for i, raw in enumerate(raw_types):
        direction = _POLICY_TYPES.get(raw) if isinstance(raw, str) else None
        if direction is None:
            r.problem((*types_path, i), _unsupported(raw, _POLICY_TYPES))
        else:
            given.add(direction)
    if len(raw_types) > 2:
        r.problem(types_path, "may not specify more than two policyTypes")
    policy_types: tuple[Direction, ...]
    if raw_types:
        policy_types = tuple(d for d in ("ingress", "egress") if d in given)
    else:
        # The API server's default: Ingress always, Egress iff the egress list is non-empty
        # (an explicit `egress: []` does not make the policy an egress policy).
        has_egress = isinstance(spec.get("egress"), list) and len(spec["egress"]) != 0
        policy_types = ("ingress", "egress") if has_egress else ("ingress",)

    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=pod_selector,
        policy_types=policy_types,
        ingress=ingress,
        egress=egress,
        source=r.where.source,
    )


def _read_rules(r: Reader, value: object, direction: Direction) -> tuple[Rule, ...]:
    path: FieldPath = ("spec", direction)
    peers_key = "from" if direction == "ingress" else "to"
    fields = _INGRESS_RULE_FIELDS if direction == "ingress" else _EGRESS_RULE_FIELDS
    rules: list[Rule] = []
    for i, raw in enumerate(r.sequence(value, path)):
        here = (*path, i)
        rule = r.mapping(raw, here, fields, _RULE_HINTS[direction])
        peers = tuple(
            _read_peer(r, peer, (*here, peers_key, j))
            for j, peer in enumerate(r.sequence(rule.get(peers_key), (*here, peers_key)))
        )
        ports = tuple(
            _read_policy_port(r, port, (*here, "ports", j))
            for j, port in enumerate(r.sequence(rule.get("ports"), (*here, "ports")))
        )
        rules.append(Rule(peers=peers, ports=ports))
    return tuple(rules)


def _read_peer(r: Reader, value: object, path: FieldPath) -> Peer:
    obj = r.mapping(value, path, _PEER_FIELDS)
    pod_selector = namespace_selector = None
    ip_block = None
    if obj.get("podSelector") is not None:
        pod_selector = read_selector(r, obj["podSelector"], (*path, "podSelector"))
    if obj.get("namespaceSelector") is not None:
        namespace_selector = read_selector(
            r, obj["namespaceSelector"], (*path, "namespaceSelector")
        )
    if obj.get("ipBlock") is not None:
        ip_block = _read_ip_block(r, obj["ipBlock"], (*path, "ipBlock"))
        if pod_selector is not None or namespace_selector is not None:
            r.problem(
                path,
                "may not specify both ipBlock and another peer (podSelector or "
                "namespaceSelector); use two entries",
            )
    elif (
        pod_selector is None
        and namespace_selector is None
        and isinstance(value, Mapping)
        and all(key in _PEER_FIELDS for key in value)  # else the unknown field says it all
    ):
        r.problem(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
    return Peer(pod_selector=pod_selector, namespace_selector=namespace_selector, ip_block=ip_block)


def _read_ip_block(r: Reader, value: object, path: FieldPath) -> IPBlock | None:
    obj = r.mapping(value, path, _IPBLOCK_FIELDS)
    text = r.required_string(obj.get("cidr"), (*path, "cidr"))
    cidr: IPNetwork | None = None
    if text is not None:
        cidr, problem = parse_cidr(text)
        if problem is not None:
            r.problem((*path, "cidr"), problem)
    excepts: list[IPNetwork] = []
    for i, raw in enumerate(r.sequence(obj.get("except"), (*path, "except"))):
        here = (*path, "except", i)
        item = r.string(raw, here)
        if item is None:
            continue
        ex, problem = parse_cidr(item)
        if problem is not None or ex is None:
            r.problem(here, problem or "invalid")
            continue
        if cidr is not None:
            if ex.version != cidr.version:
                r.problem(
                    here, f"{item!r} must be a strict subset of cidr {cidr} (another IP family)"
                )
                continue
            if not (ex.subnet_of(cidr) and ex.prefixlen > cidr.prefixlen):  # type: ignore[arg-type]
                r.problem(here, f"{item!r} must be a strict subset of cidr {cidr}")
                continue
        excepts.append(ex)
    if cidr is None:
        return None
    return IPBlock(cidr=cidr, excepts=tuple(excepts))


def _read_policy_port(r: Reader, value: object, path: FieldPath) -> PolicyPort:
    obj = r.mapping(value, path, _POLICY_PORT_FIELDS)
    protocol = read_protocol(r, obj.get("protocol"), (*path, "protocol"))
    raw_port = obj.get("port")
    port: int | str | None = None
    if isinstance(raw_port, str) and raw_port.isdigit():
        raw_port = int(raw_port)
    if isinstance(raw_port, int) and not isinstance(raw_port, bool):
        port = raw_port
        if (problem := port_number_problem(raw_port)) is not None:
            r.problem((*path, "port"), problem)
    elif isinstance(raw_port, str):
        port = raw_port
        if (problem := port_name_problem(raw_port)) is not None:
            r.problem((*path, "port"), problem)
    elif raw_port is not None:
        r.problem((*path, "port"), f"must be a number or a name, not {describe_type(raw_port)}")
    end_port = r.integer(obj.get("endPort"), (*path, "endPort"))
    if end_port is not None:
        here = (*path, "endPort")
        if raw_port is None:
            r.problem(here, "may not be specified when port is not specified")
        elif isinstance(port, str):
            r.problem(here, "may not be specified when port is non-numeric")
        elif (problem := port_number_problem(end_port)) is not None:
            r.problem(here, problem)
        elif isinstance(port, int) and end_port < port:
            r.problem(here, f"must be greater than or equal to port ({port})")
    return PolicyPort(protocol=protocol, port=port, end_port=end_port)


def policy_from_dict(obj: Mapping[str, Any], where: Where) -> NetworkPolicy:
    """A networking.k8s.io/v1 NetworkPolicy from its API dict; raises InputError (every problem)."""
    r = Reader(where)
    policy = _read_policy(r, obj)
    raise_problems(r.problems)
    return policy


def selector_from_dict(obj: object, where: Where, field: FieldPath = ()) -> LabelSelector:
    """A LabelSelector read at `field` of the object `where` names; raises InputError."""
    r = Reader(where)
    selector = read_selector(r, obj, field)
    raise_problems(r.problems)
    return selector


# --- Pods and workloads ---------------------------------------------------------------------------

_UID_NAMESPACE = uuid.UUID("6f0b3c1e-64d4-4d55-9f0c-9a6f4e1b2c7d")  # flowproof's uuid5 namespace


def synthetic_uid(namespace: str, name: str) -> str:
    """A deterministic uid for a pod that has none (manifests, workload templates)."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{namespace}/{name}"))


def _read_container_ports(
    r: Reader, spec: Mapping[str, Any], path: FieldPath
) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    names: dict[str, FieldPath] = {}
    containers_path = (*path, "containers")
    for i, raw in enumerate(r.sequence(spec.get("containers"), containers_path)):
        container = r.mapping(raw, (*containers_path, i))
        ports_path = (*containers_path, i, "ports")
        for j, raw_port in enumerate(r.sequence(container.get("ports"), ports_path)):
            here = (*ports_path, j)
            item = r.mapping(raw_port, here)
            number = r.integer(item.get("containerPort"), (*here, "containerPort"))
            if number is None:
                if isinstance(raw_port, Mapping) and "containerPort" not in item:
                    r.problem((*here, "containerPort"), "required field is missing")
                continue
            if (problem := port_number_problem(number)) is not None:
                r.problem((*here, "containerPort"), problem)
                continue
            protocol = read_protocol(r, item.get("protocol"), (*here, "protocol"))
            name = r.string(item.get("name"), (*here, "name")) or None
            if name is not None:
                if (problem := port_name_problem(name)) is not None:
                    r.problem((*here, "name"), problem)
                    name = None
                elif name in names:
                    r.problem(
                        (*here, "name"),
                        f"duplicate port name {name!r} in the pod "
                        f"(also {render_field(r.where.prefix + names[name])})",
                    )
                    name = None
                else:
                    names[name] = (*here, "name")
            ports.append(ContainerPort(port=number, protocol=protocol, name=name))
    return tuple(ports)


def _read_pod(r: Reader, obj: Mapping[str, Any]) -> Pod:
    namespace, name, meta = _metadata(r, obj)
    _check_name(r, name)
    labels = read_labels(r, meta.get("labels"), ("metadata", "labels"))
    spec = r.mapping(obj.get("spec"), ("spec",))
    status = r.mapping(obj.get("status"), ("status",))
    ips: list[str] = []
    raw_ips: list[tuple[object, FieldPath]] = [(status.get("podIP"), ("status", "podIP"))]
    for i, item in enumerate(r.sequence(status.get("podIPs"), ("status", "podIPs"))):
        entry = r.mapping(item, ("status", "podIPs", i))
        raw_ips.append((entry.get("ip"), ("status", "podIPs", i, "ip")))
    for raw, path in raw_ips:
        text = r.string(raw, path)
        if not text:
            continue
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            r.problem(path, f"{text!r} is not a valid IP address")
            continue
        if address not in ips:
            ips.append(address)
    uid = r.string(meta.get("uid"), ("metadata", "uid")) or synthetic_uid(namespace, name)
    return Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        ports=_read_container_ports(r, spec, ("spec",)),
        ips=tuple(ips),
        uid=uid,
        node=r.string(spec.get("nodeName"), ("spec", "nodeName")) or "",
        host_network=bool(r.boolean(spec.get("hostNetwork"), ("spec", "hostNetwork"))),
        phase=r.string(status.get("phase"), ("status", "phase")) or "Running",
    )


def pod_from_dict(obj: Mapping[str, Any], where: Where) -> Pod:
    """A v1 Pod from its API dict; raises InputError with every problem."""
    r = Reader(where)
    pod = _read_pod(r, obj)
    raise_problems(r.problems)
    return pod


@dataclass(frozen=True)
class _Workload:
    """What a workload says about its pods: its template pod and the selector of its real pods."""

    kind: str
    pod: Pod
    selector: LabelSelector | None  # None: cannot tell which pods are its own (never "given")
    owners: tuple[tuple[str, str], ...]  # (kind, name) of its controllers


def _template_path(kind: str) -> FieldPath:
    if kind == "CronJob":
        return ("spec", "jobTemplate", "spec", "template")
    return ("spec", "template")


def _peek(obj: Mapping[str, Any], path: FieldPath) -> Mapping[str, Any]:
    """The mapping at `path`, or empty (a reader reports a wrong type where it reads it)."""
    current: Mapping[str, Any] = obj
    for step in path:
        value = current.get(str(step))
        current = value if isinstance(value, Mapping) else {}
    return current


def _dig(r: Reader, obj: Mapping[str, Any], path: FieldPath) -> Mapping[str, Any]:
    current: Mapping[str, Any] = obj
    for i, step in enumerate(path):
        current = r.mapping(current.get(str(step)), path[: i + 1])
    return current


def _read_workload(r: Reader, obj: Mapping[str, Any], kind: str) -> _Workload:
    namespace, name, meta = _metadata(r, obj)
    _check_name(r, name)
    spec = _peek(obj, ("spec",))
    template_path = _template_path(kind)
    template = _dig(r, obj, template_path)
    has_template = _peek(obj, template_path[:-1]).get("template") is not None
    if not has_template:
        r.problem(template_path, "required field is missing")
    template_meta = r.mapping(template.get("metadata"), (*template_path, "metadata"))
    labels = read_labels(r, template_meta.get("labels"), (*template_path, "metadata", "labels"))
    pod_spec = r.mapping(template.get("spec"), (*template_path, "spec"))

    replicas = 1
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "ReplicationController", "Job"):
        key = "parallelism" if kind == "Job" else "replicas"
        value = r.integer(spec.get(key), ("spec", key))
        if value is not None and value < 0:
            r.problem(("spec", key), f"must be greater than or equal to 0, not {value}")
        elif value is not None:
            replicas = value

    selector: LabelSelector | None
    selector_path: FieldPath = (*template_path[:-1], "selector")
    raw_selector = _peek(obj, selector_path[:-1]).get("selector")
    if kind == "ReplicationController":
        # A plain label map, defaulting to the template's labels.
        given = read_labels(r, raw_selector, selector_path) or labels
        selector = LabelSelector(tuple(sorted(given.items()))) if given else None
    elif raw_selector is None and kind in _SELECTOR_REQUIRED:
        r.problem(selector_path, "required field is missing")
        selector = None
    elif raw_selector is not None:
        selector = read_selector(r, raw_selector, selector_path)
        if selector.is_empty and kind not in ("Job", "CronJob"):
            r.problem(selector_path, f"empty selector is invalid for a {kind}")
    else:
        # Jobs get a generated controller-uid selector; their template labels find their pods.
        selector = LabelSelector(tuple(sorted(labels.items()))) if labels else None
    if (
        has_template
        and selector is not None
        and not selector.is_empty
        and not selector.matches(labels)
    ):
        r.problem(
            (*template_path, "metadata", "labels"),
            f"selector {selector.describe()} does not match the template labels",
        )

    owners: list[tuple[str, str]] = []
    for i, raw in enumerate(
        r.sequence(meta.get("ownerReferences"), ("metadata", "ownerReferences"))
    ):
        ref = r.mapping(raw, ("metadata", "ownerReferences", i))
        if ref.get("controller") is True and isinstance(ref.get("kind"), str):
            owners.append((ref["kind"], str(ref.get("name", ""))))

    pod = Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        ports=_read_container_ports(r, pod_spec, (*template_path, "spec")),
        uid=synthetic_uid(namespace, name),
        host_network=bool(
            r.boolean(pod_spec.get("hostNetwork"), (*template_path, "spec", "hostNetwork"))
        ),
        workload=f"{kind}/{name}",
        replicas=replicas,
    )
    return _Workload(kind=kind, pod=pod, selector=selector, owners=tuple(owners))


def pods_from_workload(obj: Mapping[str, Any], where: Where) -> tuple[Pod, ...]:
    """The pod a workload's template stands for (one Pod, `replicas` set); raises InputError.

    Deciding whether real Pods are given for the workload needs the other objects; that is
    `snapshot_from_documents`' job.
    """
    r = Reader(where)
    kind = obj.get("kind")
    if kind not in WORKLOAD_KINDS:
        r.problem(("kind",), _unsupported(kind, sorted(WORKLOAD_KINDS)))
        raise_problems(r.problems)
    workload = _read_workload(r, obj, str(kind))
    raise_problems(r.problems)
    return (workload.pod,)


def _read_namespace(r: Reader, obj: Mapping[str, Any]) -> Namespace:
    _, name, meta = _metadata(r, obj, namespaced=False)
    _check_name(r, name, label=True)
    labels = read_labels(r, meta.get("labels"), ("metadata", "labels"))
    labels[NAMESPACE_NAME_LABEL] = name  # set by the API server on every namespace, overriding
    return Namespace(name=name, labels=labels)


def namespace_from_dict(obj: Mapping[str, Any], where: Where) -> Namespace:
    """A v1 Namespace with the automatic `kubernetes.io/metadata.name` label; raises InputError."""
    r = Reader(where)
    namespace = _read_namespace(r, obj)
    raise_problems(r.problems)
    return namespace


# --- documents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One object read from a file: a document, or one item of a `kind: List` document.

    `index` counts the documents of the file from 1; `line` is where the object starts.
    """

    obj: Mapping[str, Any]
    file: str
    index: int
    line: int
    prefix: FieldPath = ()  # the object's path inside its document, e.g. ("items", 3)
    lines: LineFinder | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> Where:
        return Where(self.file, self.index, self.line, self.prefix, self.lines)

    def line_of(self, path: FieldPath) -> int:
        """The line of the field at `path`, or of its nearest present ancestor."""
        return self.where.line(path) or self.line

    @property
    def kind(self) -> str:
        kind = self.obj.get("kind")
        return kind if isinstance(kind, str) else ""

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name), the identity the API gives an object; namespace "" if none."""
        meta = self.obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name")
        namespace = meta.get("namespace") or "default"
        if self.kind in _CLUSTER_SCOPED:
            namespace = ""
        return self.kind, str(namespace), str(name) if name is not None else ""


class _Loader(_SafeLoader):
    """A safe loader that records duplicate mapping keys, which kubectl rejects and PyYAML hides."""

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, line, first line)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(node.value):
            self._find_duplicates(node)
        return mapping

    def _find_duplicates(self, node: yaml.MappingNode) -> None:
        # Keys merged in with `<<` come from an anchor outside this node's span and may be
        # overridden; only keys written inside the node count.
        start, end = node.start_mark.index, node.end_mark.index
        first: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or not start <= key.start_mark.index <= end:
                continue
            line = key.start_mark.line + 1
            if key.value in first:
                self.duplicates.append((key.value, line, first[key.value]))
            else:
                first[key.value] = line


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _expand(
    obj: object,
    node: yaml.Node,
    file: str,
    index: int,
    prefix: FieldPath,
    lines: LineFinder,
    problems: list[InputError],
) -> list[Document]:
    """The objects of one document: the document itself, or the items of a (typed) List."""
    line = node.start_mark.line + 1
    if obj is None:
        return []
    if not isinstance(obj, Mapping):
        problems.append(
            InputError(
                f"a manifest must be a mapping (a Kubernetes object), not {describe_type(obj)}",
                file=file,
                line=line,
                document=index,
                field=render_field(prefix) or None,
            )
        )
        return []
    kind = obj.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in obj:
        items = obj.get("items")
        where = Where(file, index, line, prefix, lines)
        if items is not None and not isinstance(items, list):
            problems.append(where.error(("items",), f"must be a list, not {describe_type(items)}"))
            return []
        items_node = _child(node, "items")
        documents: list[Document] = []
        item_kind = kind[: -len("List")]
        for i, item in enumerate(items or ()):
            item_node: yaml.Node = (
                items_node.value[i] if isinstance(items_node, yaml.SequenceNode) else node
            )
            if isinstance(item, Mapping) and item_kind and "kind" not in item:
                # A typed list from the API (PodList) leaves kind and apiVersion out of its items.
                item = {"kind": item_kind, "apiVersion": obj.get("apiVersion"), **item}
            documents += _expand(
                item, item_node, file, index, (*prefix, "items", i), lines, problems
            )
        return documents
    return [Document(obj, file, index, line, prefix, lines)]


def _child(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in reversed(node.value):
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return None


def _read_text(data: bytes, file: str, problems: list[InputError]) -> list[Document]:
    loader = _Loader(data)
    lines = LineFinder(data)
    documents: list[Document] = []
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            index += 1
            obj = loader.construct_document(node)
            for key, line, first in loader.duplicates:
                problems.append(
                    InputError(
                        f"duplicate key {key!r} (first at line {first}); the later value would "
                        "silently win",
                        file=file,
                        line=line,
                        document=index,
                    )
                )
            loader.duplicates.clear()
            documents += _expand(obj, node, file, index, (), lines, problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context or ""
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            context += f" (line {exc.context_mark.line + 1})"
        reason = " ".join(p for p in (context, exc.problem) if p) or "broken YAML"
        problems.append(
            InputError(
                f"invalid YAML: {reason}",
                file=file,
                line=None if mark is None else mark.line + 1,
                document=index + 1,
            )
        )
    except yaml.YAMLError as exc:
        problems.append(InputError(f"invalid YAML: {exc}", file=file, document=index + 1))
    finally:
        loader.dispose()
    return documents


def _manifest_files(
    paths: Sequence[str | os.PathLike[str]], problems: list[InputError]
) -> list[tuple[Path, str]]:
    """(path, label) of every file to read: given files as given, directories walked and sorted."""
    files: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(path: Path, label: str) -> None:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            files.append((path, label))

    for raw in paths:
        path = Path(raw)
        label = os.fspath(raw)
        if path.is_dir():
            found: list[Path] = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in names:
                    if name.startswith(".") or name in KUSTOMIZATION_FILES:
                        continue
                    if name.endswith(MANIFEST_SUFFIXES):
                        found.append(Path(root, name))
            if not found:
                problems.append(
                    InputError("no *.yaml, *.yml or *.json manifest in this directory", file=label)
                )
            for file in sorted(found):
                add(file, os.path.join(label, os.path.relpath(file, path)))
        elif path.exists():
            add(path, label)
        else:
            problems.append(InputError("no such file or directory", file=label))
    return files


def _load_documents(
    paths: Sequence[str | os.PathLike[str]], problems: list[InputError], files: list[str]
) -> list[Document]:
    documents: list[Document] = []
    for path, label in _manifest_files(paths, problems):
        files.append(label)
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(InputError(f"cannot read: {exc.strerror or exc}", file=label))
            continue
        documents += _read_text(data, label, problems)
    return documents


def load_documents(paths: Sequence[str | os.PathLike[str]]) -> list[Document]:
    """Every object in the files and directories (recursive, sorted) given; raises InputError.

    Reads `*.yaml`, `*.yml` and `*.json` under directories (skipping hidden entries and
    kustomization files) and any file named explicitly; multi-document YAML and List items become
    one Document each. Kinds are not checked here: see `snapshot_from_documents`.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files)
    raise_problems(problems, files)
    return documents


# --- the snapshot ---------------------------------------------------------------------------------


def _check_header(r: Reader, doc: Document) -> str | None:
    """The kind to read the document as, None to ignore it; records header problems."""
    obj = doc.obj
    kind = r.required_string(obj.get("kind"), ("kind",))
    api_version = r.required_string(obj.get("apiVersion"), ("apiVersion",))
    if kind is None or api_version is None:
        return None
    known = KINDS.get(kind)
    if known is None:
        return None
    group, version = _split_api_version(api_version)
    want_group, versions = known
    if group == want_group and version not in versions:
        served = ", ".join(f"{want_group}/{v}".lstrip("/") for v in versions)
        r.problem(("apiVersion",), f"{api_version!r} is not supported for {kind}: use {served}")
        return None
    if group in _RETIRED_GROUPS:
        r.problem(
            ("apiVersion",),
            f"{api_version!r} no longer serves {kind}: use {want_group}/{versions[0]}",
        )
        return None
    if group != want_group:
        return None  # same kind name, another API (e.g. Calico's NetworkPolicy)
    return kind


def _index_pods(pods: Iterable[Pod]) -> dict[str, list[Mapping[str, str]]]:
    """Per namespace, each distinct label set once (pods of one workload share their labels)."""
    seen: dict[str, dict[frozenset[tuple[str, str]], Mapping[str, str]]] = {}
    for pod in pods:
        seen.setdefault(pod.namespace, {}).setdefault(frozenset(pod.labels.items()), pod.labels)
    return {ns: list(sets.values()) for ns, sets in seen.items()}


_Converted = Namespace | Pod | NetworkPolicy | Expectations | _Workload | None


def _convert(r: Reader, kind: str, doc: Document) -> tuple[_Converted, tuple[str, str, str]]:
    """The object a document holds, and its identity (kind, namespace, name) for duplicates."""
    from collector import expectations as expectations_format  # it imports this module

    if kind == "Namespace":
        namespace = _read_namespace(r, doc.obj)
        return namespace, ("Namespace", "", namespace.name)
    if kind == "Pod":
        pod = _read_pod(r, doc.obj)
        return pod, ("Pod", pod.namespace, pod.name)
    if kind == "NetworkPolicy":
        policy = _read_policy(r, doc.obj)
        return policy, ("NetworkPolicy", policy.namespace, policy.name)
    if kind == "FlowExpectations":
        return expectations_format.read_expectations(r, doc.obj), doc.key
    workload = _read_workload(r, doc.obj, kind)
    return workload, (kind, workload.pod.namespace, workload.pod.name)


def _build_snapshot(docs: Sequence[Document], problems: list[InputError]) -> Snapshot:
    declared: dict[str, Namespace] = {}
    pods: list[Pod] = []
    workloads: list[tuple[_Workload, Document]] = []
    policies: list[NetworkPolicy] = []
    expectation_sets: list[Expectations] = []
    ignored: list[str] = []
    first_seen: dict[tuple[str, str, str], str] = {}

    for doc in docs:
        r = Reader(doc.where, problems)
        kind = _check_header(r, doc)
        if kind is None:
            if doc.kind and isinstance(doc.obj.get("apiVersion"), str):
                name = "/".join(filter(None, doc.key[1:]))
                ignored.append(f"{doc.kind} {name} ({r.where.source})")
            continue
        before = len(problems)
        converted, identity = _convert(r, kind, doc)
        if identity[2]:
            previous = first_seen.get(identity)
            if previous is not None:
                name = "/".join(filter(None, identity[1:]))
                r.problem(("metadata", "name"), f"duplicate {kind} {name} (first at {previous})")
                continue
            first_seen[identity] = r.where.source
        if len(problems) != before:
            continue
        if isinstance(converted, Namespace):
            declared[converted.name] = converted
        elif isinstance(converted, Pod):
            pods.append(converted)
        elif isinstance(converted, NetworkPolicy):
            policies.append(converted)
        elif isinstance(converted, Expectations):
            expectation_sets.append(converted)
        elif isinstance(converted, _Workload):
            workloads.append((converted, doc))

    if ignored:
        log.debug(
            "ignored %d objects of kinds flowproof does not read: %s",
            len(ignored),
            "; ".join(ignored),
        )

    pods += _workload_pods(workloads, pods, problems)
    referenced = {pod.namespace for pod in pods} | {policy.namespace for policy in policies}
    for expectation_set in expectation_sets:
        referenced.add(expectation_set.namespace)
        for flow in expectation_set.flows:
            for target in (flow.source, flow.destination):
                if isinstance(target, PodTarget) and target.namespace:
                    referenced.add(target.namespace)
    namespaces = dict(declared)
    for name in referenced - declared.keys():
        namespaces[name] = Namespace(name=name, labels={NAMESPACE_NAME_LABEL: name})
    return Snapshot(
        namespaces={name: namespaces[name] for name in sorted(namespaces)},
        pods=tuple(pods),
        policies=tuple(policies),
        expectations=tuple(expectation_sets),
    )


def _workload_pods(
    workloads: Sequence[tuple[_Workload, Document]],
    pods: Sequence[Pod],
    problems: list[InputError],
) -> list[Pod]:
    """The template pods of the workloads whose pods are not given (and that no workload owns)."""
    label_sets = _index_pods(pods)
    names = {(w.kind, w.pod.namespace, w.pod.name) for w, _ in workloads}
    taken = {pod.key: "Pod" for pod in pods}
    result: list[Pod] = []
    for workload, doc in workloads:
        pod = workload.pod
        if any((kind, pod.namespace, name) in names for kind, name in workload.owners):
            continue  # a ReplicaSet of a listed Deployment, a Job of a listed CronJob
        selector = workload.selector
        if selector is not None and any(
            selector.matches(labels) for labels in label_sets.get(pod.namespace, ())
        ):
            continue  # its pods are given
        if pod.key in taken:
            problems.append(
                doc.where.error(
                    ("metadata", "name"),
                    f"{workload.kind} {pod.key} would stand for a pod named {pod.key}, but "
                    f"{taken[pod.key]} {pod.key} already does; rename one",
                )
            )
            continue
        taken[pod.key] = workload.kind
        result.append(pod)
    return result


def snapshot_from_documents(docs: Sequence[Document]) -> Snapshot:
    """The snapshot of the objects read; raises one InputError listing every problem.

    Reads Namespace, Pod, NetworkPolicy, the workload kinds (which stand for their pods through
    their template when no Pod of theirs is given) and flowproof.dev FlowExpectations; other kinds
    are ignored and named in a debug log line.
    """
    problems: list[InputError] = []
    snapshot = _build_snapshot(docs, problems)
    raise_problems(problems)
    return snapshot


def load_snapshot(paths: Sequence[str | os.PathLike[str]]) -> Snapshot:
    """Read manifests (files, directories, multi-document YAML, Lists) into a snapshot.

    Raises one InputError carrying every problem of every file; no snapshot is made from a
    partly bad input.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files)
    snapshot = _build_snapshot(documents, problems)
    raise_problems(problems, files)
    return snapshot
