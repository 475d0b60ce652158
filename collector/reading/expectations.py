"""The FlowExpectations format: a document of declared flows (intent) -> `Expectations`.

Owns the format's JSON Schema (`collector/reading/schemas/flowexpectations.schema.json`, also the future CRD schema)
and the checks a schema cannot express; every problem is named by file, line, field and reason, and
a document with any problem yields nothing. It must never do I/O beyond reading its schema, nor
import `kubernetes`.

    apiVersion: flowproof.dev/v1alpha1
    kind: FlowExpectations
    metadata: {name: shop, namespace: shop}       # namespace defaults to "default"
    spec:
      flows:                                      # at least one
        - name: frontend-to-api                   # required; a DNS label, unique in the document
          from: {namespace: shop, podSelector: {matchLabels: {app: frontend}}}
          to:   {podSelector: {matchLabels: {app: api}}}
          ports: ["8080/TCP"]                     # see below
          http: {path: /healthz, expectStatus: [200]}   # optional; TCP ports only
          expect: allow                           # required: allow | deny
          allowEmpty: false                       # optional: matching no pods is an error if false

`from` selects pods: `namespace` (a name) or `namespaceSelector` (labels, exclusive with
`namespace`), and `podSelector` (absent or `{}`: every pod). Without either namespace field the
document's namespace is meant. `to` is the same, or exactly one of `dns: cluster` (the cluster
DNS; ports default to 53/UDP), `cidr: 203.0.113.0/24` or `host: api.example.com`.
`ports` are required for every other destination (no implicit "all ports"): 8080, "8080",
"8080/TCP", a range "8000-8080/UDP", or a named port "http/TCP" resolved on each destination pod
(pod destinations only); the protocol is TCP, UDP or SCTP and defaults to TCP.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal

import jsonschema
from jsonschema import ValidationError

from collector.core.model import (
    Expectations,
    ExternalTarget,
    FlowExpectation,
    HttpCheck,
    LabelSelector,
    PodTarget,
    PortSpec,
    Protocol,
)
from collector.reading.documents import read_documents
from collector.reading.fields import (
    FieldPath,
    Reader,
    Where,
    close_spelling,
    describe_type,
    parse_cidr,
    port_name_problem,
    port_number_problem,
    raise_problems,
    read_selector,
    unknown_field_reason,
)
from flowproof.errors import InputError

SCHEMA_FILE: Final = "flowexpectations.schema.json"
DNS_DEFAULT_PORTS: Final = (PortSpec(protocol="UDP", port=53),)
_EXTERNAL_KEYS: Final = ("dns", "cidr", "host")
_PORT_TEXT = re.compile(
    r"(?:(?P<start>[0-9]+)(?:-(?P<end>[0-9]+))?|(?P<name>[-a-z0-9]+))(?:/(?P<protocol>TCP|UDP|SCTP))?"
)
_TYPE_WORDS: Final[Mapping[str, str]] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "object": "a mapping",
    "array": "a list",
    "boolean": "true or false",
}
_FROM_HINT: Final = "a flow starts from pods; dns, cidr and host are destinations, under to"


@functools.cache
def schema() -> Mapping[str, Any]:
    """The FlowExpectations JSON Schema (draft 2020-12)."""
    text = resources.files("collector.reading.schemas").joinpath(SCHEMA_FILE).read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema())
    return jsonschema.Draft202012Validator(schema())


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


# --- schema errors -> problems ----------------------------------------------------------------


@dataclass(frozen=True)
class _SchemaProblem:
    path: FieldPath
    reason: str
    kind: Literal["type", "missing", "unknown", "other"] = "other"
    meant: FieldPath | None = None  # for an unknown field: the known field it is a misspelling of


def _schema_problems(
    error: ValidationError, description: str | None = None
) -> Iterator[_SchemaProblem]:
    """The problems a schema error stands for, in the words the rest of flowproof uses.

    The schema's `description`s double as the rule a pattern stands for: they read as a noun
    phrase after "expected".
    """
    path: FieldPath = tuple(error.absolute_path)
    keyword = error.validator
    instance = error.instance
    here = error.schema if isinstance(error.schema, Mapping) else {}
    description = here.get("description", description)
    if keyword == "required":
        for name in _strings(error.validator_value):
            if isinstance(instance, Mapping) and name not in instance:
                yield _SchemaProblem((*path, name), "required field is missing", "missing")
    elif keyword == "additionalProperties" and isinstance(instance, Mapping):
        known = here.get("properties", {})
        for key in map(str, instance):
            if key not in known:
                hint = _FROM_HINT if path[-1:] == ("from",) and key in _EXTERNAL_KEYS else None
                close = close_spelling(key, known)
                yield _SchemaProblem(
                    (*path, key),
                    unknown_field_reason(key, known, hint),
                    "unknown",
                    None if close is None else (*path, close),
                )
    elif keyword == "type":
        expected = error.validator_value
        words = _TYPE_WORDS.get(expected, str(expected)) if isinstance(expected, str) else expected
        yield _SchemaProblem(path, f"must be {words}, not {describe_type(instance)}", "type")
    elif keyword == "enum":
        allowed = _strings(error.validator_value)
        reason = f"unsupported value {instance!r}: supported values: " + ", ".join(
            repr(v) for v in allowed
        )
        close_values = difflib.get_close_matches(str(instance), allowed, n=1)
        if close_values:
            reason += f" (did you mean {close_values[0]!r}?)"
        yield _SchemaProblem(path, reason)
    elif keyword == "pattern":
        rule = description or f"a match for {error.validator_value}"
        yield _SchemaProblem(path, f"{instance!r} is not valid: expected {rule}")
    elif keyword == "minItems":
        yield _SchemaProblem(path, "must not be empty")
    elif keyword == "maxItems":
        yield _SchemaProblem(path, f"must have at most {error.validator_value} items")
    elif keyword == "maxProperties":
        yield _SchemaProblem(path, f"must have at most {error.validator_value} entries")
    elif keyword == "maxLength":
        yield _SchemaProblem(path, f"must be at most {error.validator_value} characters long")
    elif keyword in ("minimum", "maximum"):
        low, high = here.get("minimum"), here.get("maximum")
        yield _SchemaProblem(path, f"{instance} is out of range: must be between {low} and {high}")
    elif keyword in ("anyOf", "oneOf"):
        # Report why the branch meant for this type of value failed; else describe the field.
        branches: list[ValidationError] = list(error.context or ())
        relevant = [e for e in branches if e.validator != "type"]
        if relevant:
            for sub in relevant:
                yield from _schema_problems(sub, description)
        else:
            rule = description or "valid"
            yield _SchemaProblem(path, f"must be {rule}, not {describe_type(instance)}", "type")
    else:
        yield _SchemaProblem(path, error.message)


def _check_schema(r: Reader, obj: Mapping[str, Any]) -> tuple[set[FieldPath], set[FieldPath]]:
    """Record the schema problems; return the paths they are at and the fields misspelt.

    A misspelt field is not reported again as missing: `spek` says it all about `spec`.
    """
    found = [p for error in _validator().iter_errors(obj) for p in _schema_problems(error)]
    typed = {p.path for p in found if p.kind == "type"}
    meant = {p.meant for p in found if p.meant is not None}
    paths: set[FieldPath] = set()
    for problem in found:
        if problem.path in typed and problem.kind != "type":
            continue  # `expect: yes` is "not a string"; its enum problem adds nothing
        if problem.kind == "missing" and problem.path in meant:
            continue
        r.problem(problem.path, problem.reason)
        paths.add(problem.path)
    return paths, meant


# --- semantic checks ----------------------------------------------------------------------------


def _read_target(
    r: Reader, obj: Mapping[str, Any], path: FieldPath, default_namespace: str
) -> PodTarget | ExternalTarget:
    external = [key for key in _EXTERNAL_KEYS if key in obj]
    pod_keys = [key for key in ("namespace", "namespaceSelector", "podSelector") if key in obj]
    if len(external) > 1:
        r.problem(path, f"{' and '.join(external)} are exclusive: give one destination per flow")
    if external and pod_keys:
        r.problem(path, f"{external[0]} may not be combined with {', '.join(pod_keys)}")
    if external:
        key = external[0]
        if key == "cidr":
            text = r.string(obj["cidr"], (*path, "cidr"))
            parsed = parse_cidr(text, masked_only=True) if text is not None else None
            if parsed is not None and parsed.problem is not None:
                r.problem((*path, "cidr"), parsed.problem)
            return ExternalTarget(cidr=parsed.network if parsed is not None else None)
        if key == "host":
            return ExternalTarget(host=str(obj["host"]).rstrip("."))
        return ExternalTarget(dns=str(obj["dns"]))
    namespace: str | None = obj.get("namespace")
    namespace_selector: LabelSelector | None = None
    if "namespaceSelector" in obj:
        namespace_selector = read_selector(
            r, obj["namespaceSelector"], (*path, "namespaceSelector")
        )
        if namespace is not None:
            r.problem(path, "namespace and namespaceSelector are exclusive: give one")
            namespace_selector = None
    elif namespace is None:
        namespace = default_namespace
    pod_selector = read_selector(r, obj.get("podSelector"), (*path, "podSelector"))
    return PodTarget(
        namespace=namespace, namespace_selector=namespace_selector, pod_selector=pod_selector
    )


def _read_port(r: Reader, raw: object, path: FieldPath) -> PortSpec | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return PortSpec(port=raw)  # the schema checked its range
    text = str(raw)
    match = _PORT_TEXT.fullmatch(text)
    if match is None:  # the schema's pattern rejected it already
        return None
    protocol: Protocol = "TCP"
    for candidate in ("TCP", "UDP", "SCTP"):
        if match["protocol"] == candidate:
            protocol = candidate
    if match["name"] is not None:
        if (problem := port_name_problem(match["name"])) is not None:
            r.problem(path, problem)
            return None
        return PortSpec(protocol=protocol, name=match["name"])
    start = int(match["start"])
    end = int(match["end"]) if match["end"] is not None else None
    for number in (start, end):
        if number is not None and (problem := port_number_problem(number)) is not None:
            r.problem(path, problem)
            return None
    if end is not None and end < start:
        r.problem(path, f"{text!r}: the range must not end ({end}) below its start ({start})")
        return None
    return PortSpec(protocol=protocol, port=start, end_port=None if end == start else end)


def _read_ports(
    r: Reader,
    flow: Mapping[str, Any],
    path: FieldPath,
    destination: PodTarget | ExternalTarget,
    clean: Callable[[FieldPath], bool],
    meant: set[FieldPath],
) -> tuple[PortSpec, ...]:
    raw_ports = flow.get("ports")
    if raw_ports is None:
        if isinstance(destination, ExternalTarget) and destination.dns is not None:
            return DNS_DEFAULT_PORTS
        if (*path, "ports") in meant:
            return ()  # a misspelt `ports` was reported as such
        r.problem(
            (*path, "ports"),
            'required field is missing: list the ports of the flow, e.g. ["8080/TCP"] '
            "(only a dns destination has a default)",
        )
        return ()
    ports: list[PortSpec] = []
    for i, raw in enumerate(raw_ports if isinstance(raw_ports, list) else ()):
        here: FieldPath = (*path, "ports", i)
        port = _read_port(r, raw, here) if clean(here) else None
        if port is None:
            continue
        if port.name is not None and isinstance(destination, ExternalTarget):
            r.problem(
                here,
                f"named port {port.name!r} is resolved on destination pods; a dns, cidr or "
                "host destination needs a port number",
            )
            continue
        if port not in ports:
            ports.append(port)
    return tuple(ports)


def _read_flow(
    r: Reader,
    flow: Mapping[str, Any],
    path: FieldPath,
    default_namespace: str,
    clean: Callable[[FieldPath], bool],
    meant: set[FieldPath],
) -> FlowExpectation:
    """One flow; parts with schema problems (already reported) are skipped, not guessed at."""
    source: PodTarget | ExternalTarget = PodTarget(namespace=default_namespace)
    from_path, to_path = (*path, "from"), (*path, "to")
    if clean(from_path) and isinstance(flow.get("from"), Mapping):
        source = _read_target(r, flow["from"], from_path, default_namespace)
    if isinstance(source, ExternalTarget):  # the schema allows no such keys in `from`
        source = PodTarget(namespace=default_namespace)
    ports: tuple[PortSpec, ...] = ()
    destination: PodTarget | ExternalTarget = PodTarget(namespace=default_namespace)
    if clean(to_path) and isinstance(flow.get("to"), Mapping):
        destination = _read_target(r, flow["to"], to_path, default_namespace)
        ports = _read_ports(r, flow, path, destination, clean, meant)
    http: HttpCheck | None = None
    raw_http = flow.get("http")
    if isinstance(raw_http, Mapping) and clean((*path, "http")):
        http = HttpCheck(
            path=raw_http.get("path", "/"),
            expect_status=tuple(raw_http.get("expectStatus", ())),
        )
        not_tcp = [p.describe() for p in ports if p.protocol != "TCP"]
        if not_tcp:
            r.problem((*path, "http"), f"an HTTP check needs TCP ports, not {', '.join(not_tcp)}")
    return FlowExpectation(
        name=str(flow.get("name", "")),
        source=source,
        destination=destination,
        ports=ports,
        expect="allow" if flow.get("expect") == "allow" else "deny",
        http=http,
        allow_empty=flow.get("allowEmpty") is True,
    )


def read_expectations(r: Reader, obj: Mapping[str, Any]) -> Expectations | None:
    """The Expectations of one document, recording its problems in `r`; None if there are any.

    Schema problems come first; the checks a schema cannot express then run on every part of
    the document the schema found sound, so one read reports as much as it can.
    """
    before = len(r.problems)
    bad_paths, meant = _check_schema(r, obj)

    def clean(path: FieldPath) -> bool:
        return not any(bad[: len(path)] == path for bad in bad_paths)

    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = meta.get("namespace")
    namespace = namespace if isinstance(namespace, str) and namespace else "default"
    name = meta.get("name")
    name = name if isinstance(name, str) else ""
    spec = obj.get("spec")
    raw_flows = spec.get("flows") if isinstance(spec, Mapping) else None
    flows: list[FlowExpectation] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_flows if isinstance(raw_flows, list) else ()):
        path: FieldPath = ("spec", "flows", i)
        if not isinstance(raw, Mapping):
            continue
        flow_name = raw.get("name")
        if isinstance(flow_name, str) and clean((*path, "name")):
            if flow_name in names:
                r.problem(
                    (*path, "name"),
                    f"duplicate flow name {flow_name!r} (also spec.flows[{names[flow_name]}])",
                )
            names.setdefault(flow_name, i)
        flows.append(_read_flow(r, raw, path, namespace, clean, meant))
    if len(r.problems) != before:
        return None
    return Expectations(namespace=namespace, name=name, flows=tuple(flows), source=r.where.source)


def expectations_from_dict(obj: Mapping[str, Any], where: Where) -> Expectations:
    """A FlowExpectations document (file or custom resource); raises InputError (every problem)."""
    r = Reader(where)
    expectations = read_expectations(r, obj)
    raise_problems(r.problems)
    if expectations is None:  # pragma: no cover - a None result always comes with problems
        raise InputError("invalid FlowExpectations", file=where.file)
    return expectations


def expectations_from_configmap(
    namespace: str, name: str, data: object
) -> tuple[tuple[Expectations, ...], list[str]]:
    """The FlowExpectations documents in a labelled ConfigMap's data values, and the problems.

    Each value is read like a manifest file (collector.reading.documents: line marks, duplicate
    keys refused) and each document as a FlowExpectations custom resource would be, in the
    ConfigMap's namespace (a document may leave metadata.namespace out; naming another one is an
    error). A document that cannot be read is skipped, named by ConfigMap, key, line and field;
    this never raises for bad input.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return (), [f"data must be a mapping, not {describe_type(data)}"]
    documents: list[Expectations] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for data_key in sorted(data, key=str):
        file = f"api:namespaces/{namespace}/configmaps/{name}/data/{data_key}"
        text = data[data_key]
        if not isinstance(text, str):
            problems.append(f"{file}: must be a string, not {describe_type(text)}")
            continue
        found: list[InputError] = []
        parsed = read_documents(text.encode(), file, found)
        problems += [str(p) for p in found]
        if found:
            continue
        for doc in parsed:
            where = doc.where
            document = dict(doc.obj)
            meta = document.get("metadata")
            if isinstance(meta, Mapping):
                given = meta.get("namespace")
                if given not in (None, "", namespace):
                    problems.append(
                        str(
                            where.error(
                                ("metadata", "namespace"),
                                f"{given!r} is not the ConfigMap's namespace {namespace!r}: a "
                                "ConfigMap declares expectations for its own namespace only",
                            )
                        )
                    )
                    continue
                document = {**document, "metadata": {**meta, "namespace": namespace}}
            try:
                expectations = expectations_from_dict(document, where)
            except InputError as exc:
                problems.append(str(exc))
                continue
            if expectations.key in seen:
                problems.append(
                    f"{where.source}: FlowExpectations {expectations.key} is already declared at "
                    f"{seen[expectations.key]}; this document is skipped"
                )
                continue
            seen[expectations.key] = where.source
            documents.append(expectations)
    return tuple(documents), problems
