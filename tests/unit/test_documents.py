"""The YAML reader's fast constructor builds exactly what PyYAML's safe constructor builds.

`read_documents` constructs plain documents itself from libyaml's nodes and hands anything else
(aliases, merge keys, sets, unknown tags, unhashable keys) to PyYAML's constructor. Each case here
is compared with `yaml.load_all(..., SafeLoader)` and, where keys repeat, with the duplicate-key
error and its line.
"""

from __future__ import annotations

import datetime

import pytest
import yaml

from collector.reading import documents
from collector.reading.documents import read_documents
from flowproof.errors import InputError


def _read(text: str) -> tuple[list[object], list[InputError]]:
    problems: list[InputError] = []
    documents = read_documents(text.encode(), "f.yaml", problems)
    return [d.obj for d in documents], problems


CASES = [
    pytest.param(
        "kind: Pod\nmetadata: {name: a, labels: {app: web, 'on': yes}}\nspec:\n  n: 0x1F\n"
        "  f: 1.5e3\n  o: 0o17\n  s: 1:30\n  nul: ~\n  b: off\n  q: '8080'\n  inf: .inf\n",
        id="the YAML 1.1 scalars: hex, octal, sexagesimal, bool words, null, quoted numbers",
    ),
    pytest.param(
        "kind: T\nwhen: 2026-12-06T22:00:00Z\nday: 2026-12-06\nraw: !!binary aGVsbG8=\n",
        id="timestamps and binary",
    ),
    pytest.param(
        "kind: Pod\nbase: &b {app: web, tier: x}\nspec: {a: *b, b: *b}\n",
        id="an alias (full constructor)",
    ),
    pytest.param(
        "kind: Pod\nbase: &b {a: 1, b: 2}\nmerged:\n  <<: *b\n  b: 3\n",
        id="a merge key (full constructor)",
    ),
    pytest.param(
        "kind: Pod\nset: !!set {a, b}\nomap: !!omap [{x: 1}, {y: 2}]\n",
        id="sets and ordered maps (full constructor)",
    ),
    pytest.param("a: 1\n---\nb:\n- 1\n- [2, {3: 4}]\n---\n", id="several documents, an empty one"),
    pytest.param(
        # As deep as the reader's bound lets a document go (collector.reading.documents).
        "kind: Pod\n" + "x:\n" + "".join("  " * i + "- \n" for i in range(1, 198)),
        id="deep nesting",
    ),
]


@pytest.mark.parametrize("text", CASES)
def test_the_fast_constructor_builds_what_pyyaml_builds(text: str) -> None:
    objects, problems = _read(text)
    expected = [d for d in yaml.load_all(text, Loader=yaml.SafeLoader) if d is not None]
    assert problems == []
    assert objects == expected


def test_an_alias_is_one_object_as_pyyaml_makes_it() -> None:
    objects, _ = _read("kind: Pod\nbase: &b {app: web}\nspec: {a: *b, b: *b}\n")
    spec = objects[0]["spec"]  # type: ignore[index]
    assert spec["a"] is spec["b"]


def test_a_timestamp_is_a_datetime_as_pyyaml_reads_it() -> None:
    objects, _ = _read("kind: T\nwhen: 2026-12-06T22:00:00Z\n")
    assert objects == [
        {"kind": "T", "when": datetime.datetime(2026, 12, 6, 22, tzinfo=datetime.UTC)}
    ]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        pytest.param(
            "kind: Pod\nmetadata:\n  name: a\n  labels:\n    app: x\n    app: y\n",
            6,
            "duplicate key 'app' (first at line 5)",
            id="a duplicate key deep in a plain document",
        ),
        pytest.param(
            "kind: Pod\nbase: &b {a: 1}\nspec:\n  name: x\n  <<: *b\n  name: y\n",
            6,
            "duplicate key 'name' (first at line 4)",
            id="a duplicate key beside a merge key (full constructor)",
        ),
    ],
)
def test_a_duplicate_key_is_reported_once_with_its_line(text: str, line: int, reason: str) -> None:
    _, problems = _read(text)
    assert [(p.line, p.reason) for p in problems] == [
        (line, f"{reason}; the later value would silently win")
    ]


def test_an_unknown_tag_is_refused_as_pyyaml_refuses_it() -> None:
    _, problems = _read("kind: Pod\nx: !custom 1\n")
    assert len(problems) == 1
    assert problems[0].line == 2
    assert "could not determine a constructor for the tag '!custom'" in problems[0].reason


def test_a_plain_manifest_never_reaches_pyyaml_s_generic_constructor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: object, node: object) -> object:
        raise AssertionError("the fast path fell back on a plain document")

    monkeypatch.setattr(documents._Loader, "construct_document", refuse)
    objects, problems = _read(
        "kind: Pod\nmetadata: {name: a, labels: {app: x}}\nspec: [1, 2.5, true]\n"
    )
    assert problems == []
    assert objects == [
        {"kind": "Pod", "metadata": {"name": "a", "labels": {"app": "x"}}, "spec": [1, 2.5, True]}
    ]
