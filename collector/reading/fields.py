"""The field toolkit: where a value is (file, line, field path) and how a bad one is named.

Owns `FieldPath` and its rendering, `Where` (a place in a file), `Reader` (typed access that
records every problem instead of stopping at the first), the shared validators of the API server's
rules (label keys and values, DNS names, port names and numbers, CIDRs) and the readers of label
selectors and protocols. Never raises for bad input except through `raise_problems`.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from collector.core.model import (
    PROTOCOLS,
    IPAddress,
    IPNetwork,
    LabelSelector,
    Operator,
    Protocol,
    Requirement,
)
from flowproof.errors import InputError, bounded

FieldPath = tuple[str | int, ...]
"""A field inside an object: `("spec", "ingress", 0, "from")` renders as `spec.ingress[0].from`."""

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


_DNS1123_LABEL_RULE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (at most 63 characters)"
)


_DNS1123_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (at most 253 characters)"
)


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


class LineLookup(typing.Protocol):
    """Finds the line of a field (collector.reading.documents.LineFinder)."""

    def line(self, document: int, path: FieldPath) -> int | None: ...


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
    lines: LineLookup | None = field(default=None, compare=False, repr=False)

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

    def warning(self, path: FieldPath, reason: str) -> str:
        """A warning in the form of an error's line: `file:line: field: reason`."""
        return self.error(path, reason).render()

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

    __slots__ = ("problems", "served", "warnings", "where")

    def __init__(
        self,
        where: Where,
        problems: list[InputError] | None = None,
        *,
        warnings: list[str] | None = None,
        served: bool = False,
    ) -> None:
        self.where = where
        self.problems: list[InputError] = [] if problems is None else problems
        self.warnings: list[str] = [] if warnings is None else warnings
        # An object the API server serves was accepted once, maybe under older rules (legacy
        # CIDR forms): read it the way the server's own legacy parser does.
        self.served = served

    def problem(self, path: FieldPath, reason: str) -> None:
        self.problems.append(self.where.error(path, reason))

    def warn(self, path: FieldPath, reason: str) -> None:
        self.warnings.append(self.where.warning(path, reason))

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


_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")


_LABEL_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
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


_CIDR_BAD = "is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)"


@dataclass(frozen=True)
class ParsedCidr:
    """A CIDR as read: the network (masked), or why it is refused; `warning` when it is accepted
    in a form a user should change (host bits set, a legacy form)."""

    network: IPNetwork | None
    problem: str | None = None
    warning: str | None = None


def _sloppy_ipv4(text: str) -> str | None:
    """An IPv4 address with leading zeros in its octets read as decimal (k8s.io/utils/net's
    ParseIPSloppy, the API server's legacy parser), in canonical form; None if not IPv4."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    numbers = [int(p) for p in parts]
    if any(n > 255 for n in numbers):
        return None
    return ".".join(str(n) for n in numbers)


def parse_cidr(text: str, *, served: bool = False, masked_only: bool = False) -> ParsedCidr:
    """A NetworkPolicy CIDR (`ipBlock.cidr`, `except`) read as the API server reads it.

    The API server parses with `netutils.ParseCIDRSloppy` (Go's `net.ParseCIDR` that also takes
    leading zeros) and, with StrictIPCIDRValidation (on by default since Kubernetes 1.36), refuses
    on create "leading 0s in IP or prefix length", "an IPv4-mapped IPv6 address" and "bits set
    beyond the prefix length". flowproof refuses the first two in manifests as it does. Host bits
    set are accepted as the masked network, with a warning naming the canonical form: older API
    servers accept them, clusters keep them, and network plugins enforce the masked network.
    Objects the API serves (`served`) were accepted once: every legacy form is read as the
    server's parser reads it (leading zeros as decimal, an IPv4-mapped prefix as IPv4), with a
    warning. `masked_only` (the Network Policy API's `cidr(self) == cidr(self).masked()`) refuses
    host bits instead.
    """
    bad = f"{text!r} {_CIDR_BAD}"
    address_text, slash, bits_text = text.partition("/")
    if not slash or "/" in bits_text or not bits_text.isascii() or not bits_text.isdigit():
        return ParsedCidr(None, bad)
    if "%" in address_text:
        return ParsedCidr(None, bad)  # a zone is not part of a CIDR
    legacy: list[str] = []
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        canonical = _sloppy_ipv4(address_text)
        if canonical is None:
            return ParsedCidr(None, bad)
        address = ipaddress.ip_address(canonical)
        legacy.append("leading 0s in IP or prefix length")
    if len(bits_text) > 1 and bits_text.startswith("0"):
        legacy.append("leading 0s in IP or prefix length")
    bits = int(bits_text)
    if bits > address.max_prefixlen:
        return ParsedCidr(None, bad)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        legacy.append("an IPv4-mapped IPv6 address")
    if legacy and not served:
        return ParsedCidr(None, f"{text!r} must not have {legacy[0]}")
    base: IPAddress = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Go's IPNet of a mapped address matches IPv4 addresses with the mask's last 32 bits.
        base, bits = address.ipv4_mapped, max(bits - 96, 0)
    network: IPNetwork = ipaddress.ip_network(f"{base}/{bits}", strict=False)
    host_bits = network.network_address != base
    if host_bits and masked_only:
        return ParsedCidr(None, f"{text!r} has host bits set: did you mean {network}?")
    if not legacy and not host_bits:
        return ParsedCidr(network)
    if legacy:
        how = f"{' and '.join(dict.fromkeys(legacy))}: read as {network}, as the API server's legacy parser reads it"
    else:
        how = f"host bits set: read as the masked network {network}, which network plugins enforce"
    return ParsedCidr(
        network,
        warning=f"{text!r} has {how}; write {network} (a Kubernetes 1.36+ API server refuses "
        "this form on create)",
    )


_SELECTOR_FIELDS: Final = ("matchLabels", "matchExpressions")


_REQUIREMENT_FIELDS: Final = ("key", "operator", "values")


_OPERATORS: Final[tuple[Operator, ...]] = ("In", "NotIn", "Exists", "DoesNotExist")


def _quote_hint(item: object) -> str:
    """` (quote it: '8080')` for a scalar that YAML read as a number, true/false or a date; nothing
    for a list or mapping (whose text may be anything, and large)."""
    if isinstance(item, list | tuple | Mapping) or item is None:
        return ""
    return f" (quote it: '{bounded(str(item), 60)}')"


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
                f"label values must be strings, not {describe_type(item)}{_quote_hint(item)}",
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
                    f"values must be strings, not {describe_type(item)}{_quote_hint(item)}",
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
