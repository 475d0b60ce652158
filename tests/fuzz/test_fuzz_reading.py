"""Fuzzing the one reader of manifests and expectations (files and ConfigMaps), with hypothesis.

Inputs are Kubernetes-shaped documents (Namespaces, Pods, workloads, NetworkPolicies,
FlowExpectations, Lists) whose fields take any JSON-ish value, written out as YAML and then
mutated: anchors and aliases spliced in, bytes flipped, cut short, tags and flow syntax mixed in.
Whatever the input, a read ends within a bounded time in a snapshot or in an InputError naming
the file, with a bounded message; it never raises anything else. Bounded for CI: a few hundred
examples in seconds; FLOWPROOF_FUZZ_EXAMPLES=20000 runs longer locally. Found so far: a
5,000-digit integer raised ValueError (fixed in collector.reading.documents).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.reading.documents import read_documents
from collector.reading.expectations import expectations_from_configmap
from collector.reading.fields import raise_problems
from collector.reading.objects import build_snapshot
from flowproof.errors import InputError

EXAMPLES = int(os.environ.get("FLOWPROOF_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize="FLOWPROOF_FUZZ_EXAMPLES" not in os.environ,  # CI: the same inputs every run
)
SECONDS_PER_INPUT = 5.0
MAX_MESSAGE_CHARS = 100 * 600  # at most 100 problems rendered, each bounded

KEYS = [
    "apiVersion", "kind", "metadata", "name", "namespace", "labels", "uid", "spec", "status",
    "podSelector", "namespaceSelector", "matchLabels", "matchExpressions", "key", "operator",
    "values", "ingress", "egress", "from", "to", "ports", "port", "endPort", "protocol",
    "policyTypes", "ipBlock", "cidr", "except", "containers", "containerPort", "podIP", "podIPs",
    "ip", "nodeName", "hostNetwork", "template", "selector", "replicas", "items", "flows",
    "expect", "http", "path", "expectStatus", "dns", "host", "allowEmpty", "<<",
]  # fmt: skip
KINDS = [
    "Namespace", "Pod", "Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "ReplicaSet",
    "NetworkPolicy", "FlowExpectations", "List", "PodList", "Networkpolicy", "",
]  # fmt: skip
API_VERSIONS = ["v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "flowproof.dev/v1alpha1",
                "extensions/v1beta1", "networking.k8s.io/v2", ""]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["10.0.0.0/8", "10.0.0.0/08", "8080/TCP", "http", "In", "Exists", "allow",
                     "deny", "TCP", "UDP", "SCTP", "2024-01-01", "0x1F", "1e400", "~", "null"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), inner, max_size=6),
    ),
    max_leaves=40,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": draw(st.sampled_from(API_VERSIONS)),
        "kind": draw(st.sampled_from(KINDS)),
        "metadata": draw(
            st.fixed_dictionaries(
                {"name": st.one_of(st.text(max_size=20), scalars)},
                optional={"namespace": scalars, "labels": values, "uid": scalars},
            )
        ),
    }
    doc.update(draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=4)))
    return doc


def render(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, default_flow_style=None, allow_unicode=True)


@st.composite
def texts(draw: st.DrawFn) -> bytes:
    text = render(draw(st.lists(documents(), min_size=1, max_size=4)))
    data = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 4))):
        mutation = draw(st.sampled_from(["alias", "flip", "cut", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if mutation == "alias":
            name = draw(st.sampled_from(["a", "b"]))
            data = data[:at] + f" &{name} [x, *{name}, *{name}] ".encode() + data[at:]
        elif mutation == "flip" and data:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif mutation == "cut":
            data = data[:at]
        else:
            snippet = draw(
                st.sampled_from(
                    [b"!!binary aGk=", b"!!set {a, b}", b"{", b"]", b"- ", b": ", b"\t", b"---\n",
                     b"<<: *a\n", b"!!python/object:os.system", b"\xff\xfe", b"%YAML 1.1\n"]
                )
            )  # fmt: skip
            data = data[:at] + snippet + data[at:]
    return data


def read(data: bytes) -> None:
    problems: list[InputError] = []
    started = time.monotonic()
    docs = read_documents(data, "fuzz.yaml", problems)
    build_snapshot(docs, problems)
    assert time.monotonic() - started < SECONDS_PER_INPUT
    for problem in problems:
        assert isinstance(problem, InputError)
        assert problem.file == "fuzz.yaml"
        assert len(str(problem)) <= 2_000
    if problems:
        with pytest.raises(InputError) as raised:
            raise_problems(problems, ["fuzz.yaml"])
        assert len(str(raised.value)) <= MAX_MESSAGE_CHARS


@FUZZ
@given(texts())
def test_any_manifest_text_is_a_snapshot_or_input_errors_never_a_crash(data: bytes) -> None:
    read(data)


@FUZZ
@given(st.binary(max_size=2_000))
def test_any_bytes_are_a_snapshot_or_input_errors(data: bytes) -> None:
    read(data)


@FUZZ
@given(
    st.dictionaries(
        st.one_of(st.text(max_size=10), scalars), st.one_of(texts(), values), max_size=3
    )
)
def test_any_configmap_data_gives_expectations_or_problems_never_a_crash(
    data: dict[Any, Any],
) -> None:
    decoded = {
        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in data.items()
    }
    started = time.monotonic()
    found, problems = expectations_from_configmap("shop", "flows", decoded)
    assert time.monotonic() - started < SECONDS_PER_INPUT
    assert all(isinstance(p, str) and len(p) <= 2_000 for p in problems)
    assert all(e.namespace == "shop" for e in found)
