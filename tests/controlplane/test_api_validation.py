"""The API server refuses exactly the FlowExpectations that `flowproof check` refuses.

Every document below goes to both: the reader `flowproof check` uses
(collector.reading.expectations) and the real API server with the CRD from deploy/crds, as a
server-side dry run with strict field validation (what `kubectl apply` sends). Their verdicts
must agree, document by document:

- a table of documents, one (or more) for every problem the reader can report. A tracer records
  which lines of the reader ran; every line that reports a problem must have run for some
  document, so a new check in the reader fails this test until a document (and a CEL rule in
  scripts/gen-crd.py) covers it;
- documents Hypothesis makes by mutating a valid one (derandomized: the same ones every run).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from collector.reading import expectations as reader
from collector.reading import fields
from collector.reading.expectations import expectations_from_dict
from collector.reading.fields import Where
from flowproof.errors import InputError
from lab.controlplane import ControlPlane
from tests.support.kubetools import FE_API, namespace, unique

NAMESPACE = unique("valid")


def document(**flow_overrides: Any) -> dict[str, Any]:
    flow: dict[str, Any] = {
        "name": "web-to-api",
        "from": {"podSelector": {"matchLabels": {"app": "web"}}},
        "to": {"podSelector": {"matchLabels": {"app": "api"}}},
        "ports": ["8080/TCP"],
        "expect": "allow",
    }
    for key, value in flow_overrides.items():
        if value is None:
            flow.pop(key, None)
        else:
            flow[key] = value
    return {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": {"name": "doc", "namespace": NAMESPACE},
        "spec": {"flows": [flow]},
    }


def with_spec(spec: Any) -> dict[str, Any]:
    doc = document()
    doc["spec"] = spec
    return doc


def selector(**fields_: Any) -> dict[str, Any]:
    return {"from": {"podSelector": fields_}}


def expression(**fields_: Any) -> dict[str, Any]:
    return selector(matchExpressions=[fields_])


def flows(n: int, **overrides: Any) -> dict[str, Any]:
    base = document(**overrides)["spec"]["flows"][0]
    return with_spec({"flows": [{**base, "name": f"f{i}"} for i in range(n)]})


LONG_KEY = "a" * 64
CASES: list[Any] = [
    # valid
    pytest.param(document(), True, id="a plain pod-to-pod flow"),
    pytest.param(
        document(ports=[8080, "9000-9100/UDP", "http", "80a/SCTP"]), True, id="int, range, name"
    ),
    pytest.param(document(ports=["65535"]), True, id="the highest port"),
    pytest.param(document(to={"dns": "cluster"}, ports=None), True, id="dns needs no ports"),
    pytest.param(document(to={"cidr": "203.0.113.0/24"}), True, id="a cidr"),
    pytest.param(document(to={"cidr": "2001:db8::/64"}), True, id="an IPv6 cidr"),
    pytest.param(document(to={"host": "api.example.com"}), True, id="a host"),
    pytest.param(document(http={"path": "/healthz", "expectStatus": [200]}), True, id="http"),
    pytest.param(
        document(**expression(key="example.com/tier", operator="In", values=["a", ""])),
        True,
        id="In with values",
    ),
    pytest.param(
        document(**selector(matchLabels={"example.com/a_b.c": "x-y_z.1", "e": ""})),
        True,
        id="every label character",
    ),
    pytest.param(
        document(**{"from": {"namespaceSelector": {}}, "allowEmpty": True}),
        True,
        id="every namespace",
    ),
    pytest.param(flows(64), True, id="64 flows"),
    # the schema
    pytest.param(with_spec({"flows": []}), False, id="an empty flow list"),
    pytest.param(with_spec({}), False, id="flows are required"),
    pytest.param(flows(65), False, id="65 flows are too many"),
    pytest.param(document(name="Web"), False, id="a flow name is a DNS label"),
    pytest.param(document(expect=None), False, id="expect is required"),
    pytest.param(document(expect="maybe"), False, id="expect is allow or deny"),
    pytest.param(document(expect=True), False, id="expect is a string"),
    pytest.param(document(expected="allow"), False, id="a misspelt field"),
    pytest.param(document(ports=[]), False, id="an empty port list"),
    pytest.param(document(ports=[0]), False, id="port 0"),
    pytest.param(document(ports=[70000]), False, id="port 70000"),
    pytest.param(document(ports=["80/ICMP"]), False, id="ICMP"),
    pytest.param(document(ports=["Http"]), False, id="a port name is lowercase"),
    pytest.param(document(ports=[True]), False, id="a boolean is not a port"),
    pytest.param(document(ports=["x" * 33]), False, id="a port text too long"),
    pytest.param(document(ports=[str(p) for p in range(1, 18)]), False, id="17 ports"),
    pytest.param(document(to={"dns": "public"}), False, id="dns is only cluster"),
    pytest.param(document(to={"host": "Bad_Host"}), False, id="a host is a lowercase DNS name"),
    pytest.param(document(to={"host": "a." * 127 + "b"}), False, id="a host too long"),
    pytest.param(document(http={"path": "healthz"}), False, id="an http path is absolute"),
    pytest.param(document(http={"expectStatus": [99]}), False, id="status codes are 100-599"),
    pytest.param(document(http={"expectStatus": []}), False, id="an empty status list"),
    pytest.param(
        document(**expression(key="a", operator="Equals")), False, id="an unknown operator"
    ),
    pytest.param(document(**expression(operator="Exists")), False, id="an expression without key"),
    pytest.param(
        document(**selector(matchLabels={"a": "b" * 64})), False, id="a label value too long"
    ),
    pytest.param(
        document(**selector(matchLabels={f"k{i}": "v" for i in range(17)})), False, id="17 labels"
    ),
    pytest.param(
        document(**{"from": {"dns": "cluster"}}), False, id="dns is a destination, not a source"
    ),
    pytest.param(
        document(**{"from": {"namespace": "Shop"}}), False, id="a namespace is a DNS label"
    ),
    # the reader's own checks (CEL rules in the CRD)
    pytest.param(
        with_spec({"flows": [document()["spec"]["flows"][0]] * 2}),
        False,
        id="two flows of one name",
    ),
    pytest.param(document(ports=["0/TCP"]), False, id="port 0 as text"),
    pytest.param(document(ports=["70000/UDP"]), False, id="port 70000 as text"),
    pytest.param(document(ports=["9000-70000"]), False, id="a range beyond 65535"),
    pytest.param(document(ports=["90-80/TCP"]), False, id="a range that ends below its start"),
    pytest.param(document(ports=["80-80"]), True, id="a range of one port"),
    pytest.param(document(ports=["abcdefghijklmnop"]), False, id="a port name longer than 15"),
    pytest.param(document(ports=["a--b"]), False, id="a port name with two hyphens in a row"),
    pytest.param(document(ports=["123-456-789"]), False, id="a port name without a letter"),
    pytest.param(
        document(to={"cidr": "203.0.113.0/24"}, ports=["http"]), False, id="a named port to a cidr"
    ),
    pytest.param(document(to={"dns": "cluster"}, ports=["dns"]), False, id="a named port to dns"),
    pytest.param(document(ports=None), False, id="ports are required for pods"),
    pytest.param(
        document(to={"host": "example.com"}, ports=None), False, id="ports are required for a host"
    ),
    pytest.param(document(http={"path": "/"}, ports=["80/UDP"]), False, id="http on UDP"),
    pytest.param(
        document(http={"path": "/"}, to={"dns": "cluster"}, ports=None),
        False,
        id="http on the dns default",
    ),
    pytest.param(document(to={"dns": "cluster", "cidr": "10.0.0.0/8"}), False, id="dns and cidr"),
    pytest.param(
        document(to={"cidr": "10.0.0.0/8", "host": "a.example"}), False, id="cidr and host"
    ),
    pytest.param(
        document(to={"host": "a.example", "podSelector": {}}), False, id="host and podSelector"
    ),
    pytest.param(document(to={"dns": "cluster", "namespace": "x"}), False, id="dns and namespace"),
    pytest.param(
        document(**{"from": {"namespace": "x", "namespaceSelector": {}}}),
        False,
        id="namespace and namespaceSelector",
    ),
    pytest.param(document(to={"namespace": "x", "namespaceSelector": {}}), False, id="both in to"),
    pytest.param(document(to={"cidr": "10.0.0.1/8"}), False, id="a cidr with host bits"),
    pytest.param(document(to={"cidr": "10.0.0.0/33"}), False, id="a prefix too long"),
    pytest.param(document(to={"cidr": "10.0.0.0"}), False, id="a cidr without a prefix"),
    pytest.param(document(to={"cidr": "eleven"}), False, id="not a cidr"),
    pytest.param(document(to={"cidr": "ten.0.0.0/8"}), False, id="not an address before the /"),
    pytest.param(document(to={"cidr": "fe80::1%eth0/64"}), False, id="a cidr with a zone"),
    pytest.param(document(to={"cidr": "010.0.0.0/8"}), False, id="leading zeros in a cidr"),
    pytest.param(document(to={"cidr": "2001:db8::1/64"}), False, id="an IPv6 cidr with host bits"),
    pytest.param(
        document(**selector(matchLabels={"a b": "x"})), False, id="a label key with a space"
    ),
    pytest.param(
        document(**selector(matchLabels={"a/b/c": "x"})), False, id="a label key with two slashes"
    ),
    pytest.param(
        document(**selector(matchLabels={"/b": "x"})), False, id="a label key with an empty prefix"
    ),
    pytest.param(
        document(**selector(matchLabels={"a/": "x"})), False, id="a label key with an empty name"
    ),
    pytest.param(
        document(**selector(matchLabels={"Bad_Prefix/b": "x"})),
        False,
        id="a label key prefix not a DNS name",
    ),
    pytest.param(
        document(**selector(matchLabels={LONG_KEY: "x"})),
        False,
        id="a label key name longer than 63",
    ),
    pytest.param(
        document(**selector(matchLabels={"-a": "x"})),
        False,
        id="a label key starting with a hyphen",
    ),
    pytest.param(
        document(**selector(matchLabels={"a": "x y"})), False, id="a label value with a space"
    ),
    pytest.param(
        document(**selector(matchLabels={"a": "-x"})),
        False,
        id="a label value starting with a hyphen",
    ),
    pytest.param(
        document(**expression(key="-a", operator="Exists")), False, id="an expression key"
    ),
    pytest.param(
        document(**expression(key="a", operator="In", values=["x y"])),
        False,
        id="an expression value",
    ),
    pytest.param(document(**expression(key="a", operator="In")), False, id="In without values"),
    pytest.param(
        document(**expression(key="a", operator="NotIn", values=[])),
        False,
        id="NotIn with no values",
    ),
    pytest.param(
        document(**expression(key="a", operator="Exists", values=["x"])),
        False,
        id="Exists with values",
    ),
    pytest.param(
        document(**expression(key="a", operator="DoesNotExist", values=["x"])),
        False,
        id="DoesNotExist with values",
    ),
]


def read_verdict(doc: dict[str, Any]) -> tuple[bool, str]:
    try:
        expectations_from_dict(copy.deepcopy(doc), Where(file="test.yaml"))
    except InputError as exc:
        return False, str(exc)
    return True, ""


def api_verdict(cp: ControlPlane, doc: dict[str, Any]) -> tuple[bool, str]:
    answer = cp.request(
        "POST",
        f"{FE_API}/namespaces/{NAMESPACE}/flowexpectations",
        doc,
        query={"dryRun": "All", "fieldValidation": "Strict"},
    )
    assert answer.status in (201, 400, 422), answer.body
    return answer.status == 201, str(answer.body.get("message", "")) if not answer.ok else ""


# --- the table, and every problem the reader can report -------------------------------------------


@pytest.fixture(scope="module")
def cp(controlplane: ControlPlane) -> ControlPlane:
    namespace(controlplane, NAMESPACE)
    return controlplane


@pytest.mark.parametrize(("doc", "valid"), CASES)
def test_the_reader_and_the_api_server_agree(
    cp: ControlPlane, doc: dict[str, Any], valid: bool
) -> None:
    by_reader = read_verdict(doc)
    by_api = api_verdict(cp, doc)
    assert (by_reader[0], by_api[0]) == (valid, valid), f"reader: {by_reader}\napi: {by_api}"


READER_FILES = {Path(reader.__file__).resolve(), Path(fields.__file__).resolve()}


def _executed_lines(docs: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """The lines of the reader (expectations.py, fields.py) that ran while reading `docs`."""
    executed: set[tuple[str, int]] = set()

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if Path(frame.f_code.co_filename).resolve() not in READER_FILES:
            return None

        def lines(frame: FrameType, event: str, arg: object) -> Any:
            if event == "line":
                executed.add((str(Path(frame.f_code.co_filename).resolve()), frame.f_lineno))
            return lines

        return lines

    for cached in (fields.label_key_problem, fields.label_value_problem, fields.port_name_problem):
        cached.cache_clear()  # a cached answer runs no line
    sys.settrace(tracer)
    try:
        for doc in docs:
            read_verdict(doc)
    finally:
        sys.settrace(None)
    return executed


# Lines that report a problem but that no FlowExpectations document can reach: a marker of the
# line (or the call it starts) -> why. The schema speaks first, and the reader does not look into
# a part the schema found fault with.
UNREACHABLE = {
    "label keys must be strings": "JSON keys are strings",
    "label values must be strings": "the schema types label values",
    "values must be strings": "the schema types expression values",
    '"required field is missing")': "the schema requires an expression's key and operator",
    "_unsupported(raw_operator": "the schema's enum names the operators",
    'must be no more than 63 characters"': "the schema's maxLength bounds label values",
    "must contain only lowercase letters": "the schema's pattern allows only these in port text",
    "must not begin or end with a hyphen": "the schema's pattern refuses such port text",
    "yield _SchemaProblem(path, error.message)": "the schema uses no other keyword",
    'rule = description or "valid"': "every int-or-string branch mismatch is a type problem",
    "source = PodTarget(namespace=default_namespace)": "the schema allows no dns, cidr or host under from",
}


def _reporting_lines() -> dict[tuple[str, int], str]:
    """The lines of the reader's checks that report a problem (expectations, selectors,
    labels, ports, CIDRs)."""
    wanted: dict[tuple[str, int], str] = {}
    functions = {
        "_schema_problems",
        "_read_target",
        "_read_port",
        "_read_ports",
        "_read_flow",
        "read_expectations",
        "read_labels",
        "read_selector",
        "label_key_problem",
        "label_value_problem",
        "port_name_problem",
        "port_number_problem",
        "parse_cidr",
    }
    for module in (reader, fields):
        path = str(Path(module.__file__ or "").resolve())
        source = Path(path).read_text().splitlines()
        current = ""
        for number, line in enumerate(source, start=1):
            stripped = line.strip()
            if line.startswith("def "):
                current = line[4:].split("(")[0]
            if current not in functions:
                continue
            reports = (
                "r.problem(" in stripped
                or stripped.startswith("yield _SchemaProblem(")
                or (stripped.startswith("return") and ('f"' in stripped or "bad" in stripped))
                or stripped.startswith("rule = ")
            )
            call = " ".join(text.strip() for text in source[number - 1 : number + 3])
            if reports and not any(marker in call for marker in UNREACHABLE):
                wanted[(path, number)] = f"{Path(path).name}:{number} {stripped}"
    return wanted


def test_every_problem_the_reader_reports_has_a_document_above() -> None:
    """Each line of the reader that reports a problem runs for some document of CASES."""
    executed = _executed_lines([case.values[0] for case in CASES])
    wanted = _reporting_lines()
    assert len(wanted) > 30, "the reader's reporting lines were found"
    missing = [text for key, text in sorted(wanted.items()) if key not in executed]
    assert not missing, "no document in CASES reaches:\n" + "\n".join(missing)


# --- documents Hypothesis makes -------------------------------------------------------------------

PORT_TEXTS = st.sampled_from(
    [
        "0",
        "1",
        "80",
        "65535",
        "65536",
        "80-90",
        "90-80",
        "80-80",
        "http",
        "a--b",
        "-a",
        "a-",
        "abcdefghijklmno",
        "abcdefghijklmnop",
        "123-456",
        "1a",
        "dns-tcp",
    ]
)
PORTS = st.one_of(
    st.integers(min_value=-1, max_value=70000),
    st.builds(
        lambda p, proto: p + proto,
        PORT_TEXTS,
        st.sampled_from(["", "/TCP", "/UDP", "/SCTP", "/tcp"]),
    ),
)
LABEL_TEXT = st.sampled_from(
    ["", "a", "A", "a.b", "a_b", "a-b", "-a", "a-", "a b", "x" * 63, "x" * 64, "é"]
)
LABEL_KEY = st.one_of(
    LABEL_TEXT,
    st.builds(
        lambda p, n: f"{p}/{n}",
        st.sampled_from(["", "example.com", "Example.com", "a_b"]),
        LABEL_TEXT,
    ),
)
REQUIREMENT = st.fixed_dictionaries(
    {
        "key": LABEL_KEY,
        "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Is"]),
    },
    optional={"values": st.lists(LABEL_TEXT, max_size=3)},
)
SELECTOR = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": st.dictionaries(LABEL_KEY, LABEL_TEXT, max_size=3),
        "matchExpressions": st.lists(REQUIREMENT, max_size=2),
    },
)
NAMES = st.sampled_from(["shop", "Shop", "a-b", "-a", "x" * 63, "x" * 64])
TARGET = st.fixed_dictionaries(
    {},
    optional={"namespace": NAMES, "namespaceSelector": SELECTOR, "podSelector": SELECTOR},
)
DESTINATION = st.one_of(
    TARGET,
    st.fixed_dictionaries(
        {},
        optional={
            "dns": st.sampled_from(["cluster", "public"]),
            "cidr": st.sampled_from(
                ["10.0.0.0/8", "10.0.0.1/8", "10.0.0.0/33", "::/0", "2001:db8::1/64", "x"]
            ),
            "host": st.sampled_from(["api.example.com", "API.example.com", "a..b", "example.com."]),
            "podSelector": SELECTOR,
        },
    ),
)
FLOW = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["web-to-api", "f", "Web", "x" * 64]),
        "from": TARGET,
        "to": DESTINATION,
        "expect": st.sampled_from(["allow", "deny", "Allow"]),
    },
    optional={
        "ports": st.lists(PORTS, max_size=3),
        "http": st.fixed_dictionaries(
            {},
            optional={
                "path": st.sampled_from(["/", "/healthz", "healthz"]),
                "expectStatus": st.lists(st.integers(min_value=90, max_value=610), max_size=2),
            },
        ),
        "allowEmpty": st.booleans(),
    },
)
SPEC = st.fixed_dictionaries({"flows": st.lists(FLOW, min_size=0, max_size=3)})


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=SPEC)
def test_documents_hypothesis_makes_get_the_same_verdict_from_both(
    cp: ControlPlane, spec: dict[str, Any]
) -> None:
    doc = with_spec(spec)
    by_reader = read_verdict(doc)
    by_api = api_verdict(cp, doc)
    assert by_reader[0] == by_api[0], f"{doc}\nreader: {by_reader}\napi: {by_api}"
