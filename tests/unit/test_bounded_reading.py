"""The one reader of files and ConfigMaps is bounded: aliases, sizes, document counts, file kinds.

Hostile or careless input (an alias bomb, a symlink to /dev/zero, a FIFO, a symlink loop, a huge
value) ends in a clear InputError naming the file and the line, quickly and in bounded memory,
and the message itself stays short whatever the input held.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from collector.reading import documents, manifests
from collector.reading.documents import read_documents
from collector.reading.expectations import expectations_from_configmap
from collector.reading.manifests import load_documents, load_snapshot
from flowproof.errors import InputError


def bomb(levels: int = 8, width: int = 9) -> str:
    """Aliases that expand to width**levels items (9**8: 43 million) from a few lines."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines)


def indented(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


POD_LABELS = f"""apiVersion: v1
kind: Pod
metadata:
  name: a
  labels:
{indented(bomb(), 4)}
"""

SELECTOR_VALUES = f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: p, namespace: shop}}
x-anchors:
{indented(bomb(), 2)}
spec:
  podSelector:
    matchExpressions:
      - {{key: app, operator: In, values: *l7}}
"""

EXPECTATION_PORTS = f"""apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {{name: e, namespace: shop}}
x-anchors:
{indented(bomb(), 2)}
spec:
  flows:
    - name: f
      from: {{podSelector: {{}}}}
      to: {{podSelector: {{}}}}
      ports: *l7
      expect: allow
"""

NESTED_LISTS = """apiVersion: v1
kind: List
x-anchors:
  - &n0 {apiVersion: v1, kind: Namespace, metadata: {name: n}}
  - &n1 {apiVersion: v1, kind: List, items: [*n0, *n0, *n0, *n0, *n0, *n0, *n0, *n0]}
  - &n2 {apiVersion: v1, kind: List, items: [*n1, *n1, *n1, *n1, *n1, *n1, *n1, *n1]}
  - &n3 {apiVersion: v1, kind: List, items: [*n2, *n2, *n2, *n2, *n2, *n2, *n2, *n2]}
  - &n4 {apiVersion: v1, kind: List, items: [*n3, *n3, *n3, *n3, *n3, *n3, *n3, *n3]}
  - &n5 {apiVersion: v1, kind: List, items: [*n4, *n4, *n4, *n4, *n4, *n4, *n4, *n4]}
  - &n6 {apiVersion: v1, kind: List, items: [*n5, *n5, *n5, *n5, *n5, *n5, *n5, *n5]}
  - &n7 {apiVersion: v1, kind: List, items: [*n6, *n6, *n6, *n6, *n6, *n6, *n6, *n6]}
items: [*n7, *n7, *n7, *n7, *n7, *n7, *n7, *n7]
"""


def finishes_within(seconds: float, action: Callable[[], object]) -> object:
    """Run `action` in a thread; fail (instead of hanging the suite) if it takes longer."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds:g} s"
    assert time.monotonic() - started < seconds
    return outcome[0]


def problem_of(path: Path, seconds: float = 5.0) -> InputError:
    raised = finishes_within(seconds, lambda: load_snapshot([path]))
    assert isinstance(raised, InputError), raised
    assert raised.problems, raised
    return raised.problems[0]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(POD_LABELS, 1, id="an alias bomb in a label value"),
        pytest.param(SELECTOR_VALUES, 1, id="an alias bomb in matchExpressions.values"),
        pytest.param(EXPECTATION_PORTS, 1, id="an alias bomb in expectation ports"),
        pytest.param(NESTED_LISTS, 1, id="aliases of nested Lists"),
    ],
)
def test_aliases_that_expand_past_the_bound_are_refused_quickly(
    tmp_path: Path, text: str, line: int
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    problem = problem_of(path)
    assert problem.file == str(path)
    assert problem.line == line
    assert "aliases" in problem.reason and "expand" in problem.reason, problem.reason


def test_aliases_that_stay_small_are_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        "  - {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: &c {team: a}}}\n"
        "  - {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: *c}}\n"
    )
    snapshot = load_snapshot([path])
    assert snapshot.namespaces["b"].labels["team"] == "a"


def test_a_file_larger_than_the_cap_is_refused_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.yaml"
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n# " + "x" * 2000 + "\n")
    problem = problem_of(path)
    assert problem.file == str(path)
    assert "larger than" in problem.reason and "1000 bytes" in problem.reason, problem.reason


def test_a_configmap_value_larger_than_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "MAX_DOCUMENT_BYTES", 1000)
    found, problems = expectations_from_configmap("shop", "flows", {"f.yaml": "# " + "x" * 2000})
    assert found == ()
    assert len(problems) == 1 and "larger than" in problems[0], problems


def test_more_documents_than_the_cap_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(documents, "MAX_DOCUMENTS", 5)
    path = tmp_path / "many.yaml"
    path.write_text(
        "".join(
            f"---\n{{apiVersion: v1, kind: Namespace, metadata: {{name: n{i}}}}}\n"
            for i in range(9)
        )
    )
    problem = problem_of(path)
    assert problem.line == 12 and problem.document == 6
    assert "more than 5 documents" in problem.reason, problem.reason


def test_a_symlink_to_dev_zero_is_not_read(tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    problem = problem_of(link)
    assert problem.file == str(link)
    assert "not a regular file" in problem.reason and "character device" in problem.reason


def test_a_fifo_named_yaml_is_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    problem = problem_of(fifo)
    assert "not a regular file" in problem.reason and "FIFO" in problem.reason
    # The same inside a walked directory.
    raised = finishes_within(5, lambda: load_documents([tmp_path]))
    assert isinstance(raised, InputError) and "FIFO" in str(raised)


def test_a_symlink_loop_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    problem = problem_of(tmp_path / "a.yaml")
    assert "symbolic link loop" in problem.reason, problem.reason
    raised = finishes_within(5, lambda: load_documents([tmp_path]))
    assert isinstance(raised, InputError), raised
    assert {p.file for p in raised.problems} == {
        os.path.join(str(tmp_path), "a.yaml"),
        os.path.join(str(tmp_path), "b.yaml"),
    }


HUGE_LIST = ", ".join(["1234567890"] * 20_000)
HUGE = 200_000


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {{k: [{HUGE_LIST}]}}\n",
            id="a huge list where a label value belongs",
        ),
        pytest.param(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {{{'k' * HUGE}: v}}\n",
            id="a huge label key",
        ),
        pytest.param(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {'a' * HUGE}\n",
            id="a huge name",
        ),
        pytest.param(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n"
            "spec:\n  podSelector: {}\n  ingress:\n  - from:\n"
            f"    - ipBlock: {{cidr: {'1' * HUGE}}}\n",
            id="a huge number where a CIDR belongs",
        ),
    ],
)
def test_an_error_message_never_carries_unbounded_input(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    raised = finishes_within(10, lambda: load_snapshot([path]))
    assert isinstance(raised, InputError)
    assert len(str(raised)) < 2000, str(raised)[:3000]


def test_very_many_problems_are_summarised(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    labels = ", ".join(f"k{i}: [1]" for i in range(5000))
    path.write_text(f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {{{labels}}}\n")
    raised = finishes_within(10, lambda: load_snapshot([path]))
    assert isinstance(raised, InputError)
    assert len(raised.problems) == 5000  # every one is kept for programs
    text = str(raised)
    assert len(text.splitlines()) <= 101 and "and 4900 more problems" in text, text[-300:]


def test_read_documents_refuses_a_bomb_from_any_caller() -> None:
    problems: list[InputError] = []
    started = time.monotonic()
    docs = read_documents(POD_LABELS.encode(), "api:configmaps/x", problems)
    assert time.monotonic() - started < 5
    assert docs == [] and len(problems) == 1 and "aliases" in problems[0].reason
