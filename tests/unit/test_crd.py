"""The FlowExpectations CRD: generated from the file format's schema, structural, and equivalent to it.

The CRD file must be exactly what scripts/gen-crd.py makes from
collector/reading/schemas/flowexpectations.schema.json (so it can never drift from the file format), must
obey the structural-schema rules the API server enforces, and must accept and reject the same
documents as the file format's schema, except for unknown fields (a CRD prunes them, and
`kubectl apply` rejects them through server-side field validation).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import jsonschema
import pytest
import yaml

from collector import kube
from collector.core.statuses import FAILING, Status
from collector.reading.expectations import schema as file_schema

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "crds" / "flowexpectations.yaml"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crd", ROOT / "scripts" / "gen-crd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_crd = _generator()


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def open_api(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


# --- generated, never edited -------------------------------------------------------------------


def test_the_committed_crd_is_what_the_generator_makes_from_the_schema_file() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == gen_crd.generate(), (
        "deploy/crds/flowexpectations.yaml is stale: run `python3 scripts/gen-crd.py`"
    )


def test_check_mode_fails_on_a_stale_file_and_passes_on_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "flowexpectations.yaml"
    monkeypatch.setattr(gen_crd, "CRD_PATH", target)
    monkeypatch.setattr(gen_crd, "ROOT", tmp_path)
    target.write_text(gen_crd.generate().replace("shortNames", "shortnames"), encoding="utf-8")
    assert gen_crd.main(["--check"]) == 1
    assert gen_crd.main([]) == 0
    assert gen_crd.main(["--check"]) == 0


def test_the_crd_names_are_the_ones_the_kubernetes_source_lists_and_patches(
    crd: dict[str, Any],
) -> None:
    spec = crd["spec"]
    assert spec["group"] == kube.FLOWEXPECTATIONS_GROUP
    assert [v["name"] for v in spec["versions"]] == [kube.FLOWEXPECTATIONS_VERSION]
    assert spec["names"]["plural"] == kube.FLOWEXPECTATIONS_PLURAL
    assert spec["names"]["kind"] == "FlowExpectations"
    assert spec["names"]["shortNames"] == ["fe"]
    assert spec["scope"] == "Namespaced"
    assert (
        crd["metadata"]["name"] == f"{kube.FLOWEXPECTATIONS_PLURAL}.{kube.FLOWEXPECTATIONS_GROUP}"
    )
    [version] = spec["versions"]
    assert version["subresources"] == {"status": {}}


# --- structural: the rules the API server enforces on a CRD schema ----------------------------


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (properties, items and additionalProperties schemas)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_every_node_names_its_type_or_is_int_or_string(open_api: dict[str, Any]) -> None:
    untyped = [
        p
        for p, n in _nodes(open_api)
        if "type" not in n and not n.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


def test_no_node_forbids_additional_properties_or_uses_dollar_keywords(
    open_api: dict[str, Any],
) -> None:
    bad = [
        (p, k)
        for p, n in _nodes(open_api)
        for k in n
        if k.startswith("$") or (k == "additionalProperties" and n[k] is False)
    ]
    assert bad == []


def test_junctors_appear_only_in_the_one_int_or_string_shape(open_api: dict[str, Any]) -> None:
    junctors = [
        (p, k, n[k])
        for p, n in _nodes(open_api)
        for k in ("anyOf", "allOf", "oneOf", "not")
        if k in n
    ]
    assert junctors, "the port item is int-or-string: expected one anyOf"
    for path, keyword, value in junctors:
        assert keyword == "anyOf", path
        assert value == [{"type": "integer"}, {"type": "string"}], path


def test_metadata_at_the_root_is_left_to_the_api_server(open_api: dict[str, Any]) -> None:
    assert open_api["properties"]["metadata"] == {"type": "object"}
    assert open_api["type"] == "object"
    assert "additionalProperties" not in open_api


def test_arrays_always_say_what_their_items_are(open_api: dict[str, Any]) -> None:
    assert [p for p, n in _nodes(open_api) if n.get("type") == "array" and "items" not in n] == []


@pytest.mark.parametrize(
    "node",
    [
        pytest.param({"oneOf": [{"type": "string"}, {"type": "integer"}]}, id="oneOf is refused"),
        pytest.param(
            {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            id="anyOf without x-kubernetes-int-or-string is refused",
        ),
        pytest.param(
            {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer", "minimum": 1}, {"type": "integer", "maximum": 9}],
            },
            id="int-or-string needs one integer and one string branch",
        ),
        pytest.param(
            {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer", "minLength": 1}, {"type": "string", "minLength": 2}],
            },
            id="a check in both int-or-string branches cannot be moved up",
        ),
    ],
)
def test_the_generator_refuses_what_it_cannot_make_structural(node: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"spec\.x"):
        gen_crd.structural({"type": "object", "properties": {"x": node}})


def test_additional_properties_schemas_are_kept_and_false_is_dropped() -> None:
    made = gen_crd.structural(
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}
            },
        }
    )
    assert made == {
        "type": "object",
        "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}},
    }


# --- the same rules as the file format -----------------------------------------------------------


def _document(**flow_overrides: Any) -> dict[str, Any]:
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
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"flows": [flow]},
    }


def _shop_example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples" / "shop" / "expectations.yaml").read_text(encoding="utf-8")
    )
    return loaded


DOCUMENTS = [
    pytest.param(_shop_example(), True, id="the shop example is valid"),
    pytest.param(_document(), True, id="a plain pod-to-pod flow is valid"),
    pytest.param(_document(ports=[8080, "9000-9100/UDP", "http"]), True, id="int, range, name"),
    pytest.param(_document(ports=["53/SCTP"]), True, id="SCTP is a protocol"),
    pytest.param(_document(to={"dns": "cluster"}, ports=None), True, id="dns needs no ports"),
    pytest.param(_document(to={"cidr": "203.0.113.0/24"}), True, id="a cidr destination"),
    pytest.param(_document(to={"host": "api.example.com"}), True, id="a host destination"),
    pytest.param(_document(http={"path": "/healthz", "expectStatus": [200, 204]}), True, id="http"),
    pytest.param(
        _document(
            **{
                "from": {
                    "namespaceSelector": {
                        "matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]
                    }
                }
            }
        ),
        True,
        id="matchExpressions",
    ),
    pytest.param(_document(ports=[0]), False, id="port 0 is refused"),
    pytest.param(_document(ports=[70000]), False, id="port 70000 is refused"),
    pytest.param(_document(ports=["80/ICMP"]), False, id="ICMP is not a protocol"),
    pytest.param(_document(ports=["Http"]), False, id="a port name is lowercase"),
    pytest.param(_document(ports=[]), False, id="an empty port list is refused"),
    pytest.param(_document(ports=[True]), False, id="a boolean is not a port"),
    pytest.param(_document(expect="maybe"), False, id="expect is allow or deny"),
    pytest.param(_document(expect=None), False, id="expect is required"),
    pytest.param(_document(name="Web"), False, id="a flow name is a DNS label"),
    pytest.param(_document(to={"dns": "public"}), False, id="dns is only cluster"),
    pytest.param(_document(to={"host": "Bad_Host"}), False, id="a host is a lowercase DNS name"),
    pytest.param(_document(http={"path": "healthz"}), False, id="an http path is absolute"),
    pytest.param(_document(http={"expectStatus": [99]}), False, id="status codes are 100-599"),
    pytest.param(
        _document(
            **{"from": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}}}
        ),
        False,
        id="an unknown operator is refused",
    ),
    pytest.param({**_document(), "spec": {"flows": []}}, False, id="an empty flow list is refused"),
    pytest.param({**_document(), "spec": {}}, False, id="flows are required"),
]


@pytest.mark.parametrize(("document", "valid"), DOCUMENTS)
def test_the_crd_and_the_file_format_accept_and_refuse_the_same_documents(
    open_api: dict[str, Any], document: dict[str, Any], valid: bool
) -> None:
    by_file = jsonschema.Draft202012Validator(file_schema()).is_valid(document)
    by_crd = jsonschema.Draft202012Validator(open_api).is_valid(document)
    assert (by_file, by_crd) == (valid, valid)


def test_unknown_fields_differ_by_design_the_crd_prunes_what_the_file_format_refuses(
    open_api: dict[str, Any],
) -> None:
    document = _document(expected="allow")  # a misspelt field
    assert not jsonschema.Draft202012Validator(file_schema()).is_valid(document)
    assert jsonschema.Draft202012Validator(open_api).is_valid(document)


# --- status: what the collector writes ----------------------------------------------------------


def _status() -> dict[str, Any]:
    return {
        "observedGeneration": 3,
        "lastVerified": "2026-01-01T00:00:00Z",
        "flows": 3,
        "failing": 1,
        "counts": {"PASS": 1, "FORBIDDEN_OPEN": 1, "PENDING": 1},
        "failures": [
            {
                "name": "frontend-not-to-db",
                "status": "FORBIDDEN_OPEN",
                "reason": "connected to db-0:5432 though the intent is deny",
                "lastVerified": "2026-01-01T00:00:00Z",
            }
        ],
    }


def test_the_status_the_collector_writes_fits_the_status_schema(open_api: dict[str, Any]) -> None:
    status_schema = open_api["properties"]["status"]
    jsonschema.Draft202012Validator(status_schema).validate(_status())
    wrong = copy.deepcopy(_status())
    wrong["failures"][0]["status"] = "BROKEN"
    assert not jsonschema.Draft202012Validator(status_schema).is_valid(wrong)


def test_status_names_exactly_the_statuses_and_failing_set_of_the_code(
    open_api: dict[str, Any],
) -> None:
    status = open_api["properties"]["status"]["properties"]
    assert set(status["counts"]["properties"]) == set(get_args(Status))
    assert set(status["failures"]["items"]["properties"]["status"]["enum"]) == set(get_args(Status))
    assert set(gen_crd.FAILING_STATUSES) == FAILING


_COLUMN_TYPES = {
    "integer": ("integer", None),
    "date": ("string", "date-time"),
    "string": ("string", None),
}


def test_printer_columns_point_at_fields_of_the_right_type(
    crd: dict[str, Any], open_api: dict[str, Any]
) -> None:
    [version] = crd["spec"]["versions"]
    names = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Verified", "Reason", "Ready", "Flows", "Failing", "Last Verified", "Age"]
    for column in version["additionalPrinterColumns"]:
        # `.status.conditions[?(@.type=="Verified")].status` walks into the condition items.
        path = re.sub(r"\[\?\(@\.type==\"(\w+)\"\)\]", ".[]", column["jsonPath"])
        path = path.lstrip(".").replace("..", ".").split(".")
        if path == ["metadata", "creationTimestamp"]:
            continue
        node: Mapping[str, Any] = open_api
        for part in path:
            node = node["items"] if part == "[]" else node["properties"][part]
        kind, fmt = _COLUMN_TYPES[column["type"]]
        assert node["type"] == kind, column["name"]
        if fmt:
            assert node.get("format") == fmt, column["name"]


def test_the_schema_file_is_the_one_the_generator_reads() -> None:
    assert json.loads(gen_crd.SCHEMA_PATH.read_text(encoding="utf-8")) == file_schema()


# --- conditions ------------------------------------------------------------------------------------


def test_conditions_are_a_list_keyed_by_type_in_the_metav1_shape(open_api: dict[str, Any]) -> None:
    conditions = open_api["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["observedGeneration"]["type"] == "integer"


def test_the_conditions_the_collector_writes_fit_the_schema(open_api: dict[str, Any]) -> None:
    from collector.cluster import READY, VERIFIED, with_conditions

    status_schema = open_api["properties"]["status"]
    status = with_conditions(_status(), [], now=1_800_000_000)
    assert [c["type"] for c in status["conditions"]] == [VERIFIED, READY]
    assert {VERIFIED, READY} == set(gen_crd.CONDITION_TYPES)
    jsonschema.Draft202012Validator(
        status_schema, format_checker=jsonschema.FormatChecker()
    ).validate(status)
    wrong = copy.deepcopy(status)
    wrong["conditions"][0]["reason"] = "flows failing"  # not one CamelCase word
    assert not jsonschema.Draft202012Validator(status_schema).is_valid(wrong)
