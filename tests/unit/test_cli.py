"""The command line feels like kubectl: the same `-o` names everywhere, help on every flag and an
Examples section per command, shell completion that completes, a summary line that agrees with the
exit code, no traceback when the reader closes the pipe, and `lab up` taking `-e` like `lab test`.

The parsers walked here are the real ones (`flowproof.cli.build_parser` holds every delegated
command's whole parser); completion runs in a real bash; the pipe is closed by a real `head`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from collector.core.reporting import render_markdown, render_table, summary_line
from collector.core.views import FlowView
from flowproof import cli, verifying
from flowproof.output import OUTPUT_FORMATS
from lab import cli as lab_cli

ROOT = Path(__file__).resolve().parents[2]
SHOP = str(ROOT / "examples" / "shop")


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser under `parser`, with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))


ALL = list(commands(cli.build_parser()))
LEAVES = [
    (path, parser)
    for path, parser in ALL
    if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
]


def test_every_command_is_walked() -> None:
    names = {" ".join(path) for path, _ in ALL}
    assert {"check", "matrix", "explain", "verify", "lab up", "lab test", "lab status"} <= names
    assert {"collector", "agent", "completion"} <= names


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) or "flowproof" for p, _ in ALL])
def test_every_flag_has_help_and_every_command_examples(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction)
        and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert missing == [], f"flowproof {' '.join(path)}: flags without help"
    assert parser.epilog and parser.epilog.startswith("Examples:"), " ".join(path)
    assert "flowproof" in parser.epilog
    assert parser.format_help().count("\n  # ") >= 1, "the examples are printed as written"


def _output_choices(parser: argparse.ArgumentParser) -> tuple[str, ...] | None:
    for action in parser._actions:
        if "--output" in action.option_strings:
            return tuple(action.choices or ())
    return None


def test_the_same_output_names_on_every_command() -> None:
    found = {" ".join(p): _output_choices(parser) for p, parser in LEAVES}
    with_output = {name: choices for name, choices in found.items() if choices is not None}
    assert set(with_output) >= {"check", "matrix", "explain", "verify", "lab status", "lab test"}
    for name, choices in with_output.items():
        assert set(choices) <= set(OUTPUT_FORMATS), name
        assert choices[:4] == ("table", "wide", "json", "yaml"), name
    for name in ("check", "verify", "lab test"):
        assert "markdown" in with_output[name], name


@pytest.mark.parametrize("output", ["table", "wide", "json", "yaml", "markdown"])
def test_check_prints_every_output_format(output: str) -> None:
    out = io.StringIO()
    assert cli.main(["check", "-f", SHOP, "-o", output], stdout=out) == 0
    text = out.getvalue()
    if output == "json":
        assert json.loads(text)["summary"]["verdict"] == "OK"
    elif output == "yaml":
        assert yaml.safe_load(text)["summary"] == {
            "verdict": "OK",
            "flows": 10,
            "failed": 0,
            "statuses": {"PASS": 10},
        }
    elif output == "markdown":
        assert text.startswith("### ✅ flowproof check")
    else:
        assert text.rstrip().endswith("OK: 10 flows: 10 PASS")
        assert ("LAST VERIFIED" in text) is (output == "wide")


@pytest.mark.parametrize("output", ["table", "wide", "json", "yaml"])
def test_matrix_and_explain_print_every_output_format(output: str) -> None:
    out = io.StringIO()
    assert cli.main(["matrix", "-f", SHOP, "--port", "5432/TCP", "-o", output], stdout=out) == 0
    if output in ("json", "yaml"):
        cells = (json.loads if output == "json" else yaml.safe_load)(out.getvalue())
        api_db = [c for c in cells if c["from"] == "shop/api" and c["to"] == "shop/db"]
        assert [c["allowed"] for c in api_db] == [True]
    elif output == "wide":
        [line] = [
            r for r in out.getvalue().splitlines() if r.startswith("shop/api ") and "shop/db" in r
        ]
        assert "allow" in line and "shop/db-ingress" in line, line
    explained = io.StringIO()
    argv = ["explain", "-f", SHOP, "--from", "shop/api", "--to", "shop/db", "--port", "5432/TCP"]
    assert cli.main([*argv, "-o", output], stdout=explained) == 0
    if output in ("json", "yaml"):
        verdict = (json.loads if output == "json" else yaml.safe_load)(explained.getvalue())
        assert verdict["allowed"] is True
    else:
        assert ("allowed by:" in explained.getvalue()) is (output == "wide")


def test_matrix_counts_in_any_document_format() -> None:
    out = io.StringIO()
    assert (
        cli.main(["matrix", "-f", SHOP, "--port", "8080/TCP", "--counts", "-o", "yaml"], stdout=out)
        == 0
    )
    [row] = yaml.safe_load(out.getvalue())
    assert row["pairs"] == row["pods"] ** 2 == row["allowed"] + row["denied"]


def _row(status: str) -> FlowView:
    return FlowView(
        key=f"k-{status}",
        kind="declared",
        expectation="shop/shop",
        flow="f",
        source="shop/a",
        source_namespace="shop",
        source_group="a",
        destination="shop/b",
        destination_namespace="shop",
        destination_group="b",
        port=80,
        protocol="TCP",
        intent=True,
        model=True,
        reality=None,
        observed=None,
        status=status,  # type: ignore[arg-type]
        reason="why",
    )


@pytest.mark.parametrize(
    ("answer", "rows", "code", "word"),
    [
        pytest.param({"decided": True}, ["PASS"], 0, "OK", id="all pass: exit 0, OK"),
        pytest.param(
            {"decided": False, "reasons": ["no agent"]},
            ["PASS"],
            2,
            "UNDECIDED",
            id="every row passes but the answer is undecided: exit 2, never OK",
        ),
        pytest.param({"decided": True}, [], 2, "UNDECIDED", id="no flows at all: exit 2"),
        pytest.param(
            {"decided": True}, ["PASS", "INCONCLUSIVE"], 2, "UNDECIDED", id="an inconclusive flow"
        ),
        pytest.param(
            {"decided": False}, ["REQUIRED_BLOCKED"], 1, "FAIL", id="a failure wins: exit 1"
        ),
    ],
)
def test_the_summary_line_agrees_with_the_exit_code(
    answer: dict[str, object],
    rows: list[str],
    code: int,
    word: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    answer = {**answer, "rows": [_row(s).to_json() for s in rows]}
    markdown = tmp_path / "report.md"
    got = verifying.report(answer, verifying.Outputs(markdown=str(markdown)))
    out = capsys.readouterr().out
    assert got == code
    [line] = [x for x in out.splitlines() if x.startswith(("OK:", "FAIL:", "UNDECIDED:"))]
    assert line.startswith(word + ":")
    assert markdown.read_text().splitlines()[2].startswith(word + ":")


def test_summary_renderers_never_say_ok_undecided() -> None:
    rows = [_row("PASS")]
    assert summary_line(rows, decided=False).startswith("UNDECIDED:")
    assert render_table(rows, decided=False).splitlines()[-1].startswith("UNDECIDED:")
    assert render_markdown(rows, decided=False).startswith("### ⚠️ ")


def test_progress_shows_on_a_terminal_and_stays_quiet_in_ci() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert verifying.show_progress("auto", Terminal(), {}) is True
    assert verifying.show_progress("auto", Terminal(), {"CI": "true"}) is False
    assert verifying.show_progress("auto", io.StringIO(), {}) is False
    assert verifying.show_progress("always", io.StringIO(), {"CI": "1"}) is True
    assert verifying.show_progress("never", Terminal(), {}) is False
    screen = Terminal()
    line = verifying.ProgressLine(screen)
    line.update({"phase": "probing", "decided": 3, "total": 8, "elapsed": 1.5})
    line.clear()
    assert screen.getvalue() == "\r\x1b[Kverify: 3/8 flows decided (1.5 s)\r\x1b[K"


def _into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """`python -m flowproof ARGV` writing into a pipe whose reader is gone, as after `| head`
    (the read end is closed before the process starts, so its first write fails for sure)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "flowproof", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("matrix", "-f", SHOP, "-o", "wide"), id="matrix"),
        pytest.param(("check", "-f", SHOP, "-o", "json"), id="check"),
        pytest.param(("completion", "bash"), id="completion"),
    ],
)
def test_no_traceback_when_the_reader_closes_the_pipe(argv: tuple[str, ...]) -> None:
    done = _into_a_closed_pipe(*argv)
    # Only the reader's warnings (the shop's Services are ignored kinds), never a traceback.
    lines = done.stderr.decode().splitlines()
    assert all(": warning: " in line for line in lines), done.stderr.decode()
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell shows a writer killed by it


def test_bash_completion_completes_commands_flags_and_choices(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = tmp_path / "flowproof.bash"
    out = io.StringIO()
    assert cli.main(["completion", "bash"], stdout=out) == 0
    script.write_text(out.getvalue())

    def complete(*words: str) -> list[str]:
        program = (
            f"source {script}\n"
            f"COMP_WORDS=(flowproof {' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD={len(words)}\n"
            'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
            "_shtab_flowproof\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(
            [bash, "-c", program], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.split()

    assert complete("ch") == ["check"]
    assert complete("check", "-o", "") == list(OUTPUT_FORMATS)
    assert "--expectations" in complete("lab", "up", "--ex")
    assert "test" in complete("lab", "")
    assert "--once" in complete("verify", "--on")


def test_zsh_and_tcsh_scripts_are_made_too() -> None:
    for shell in ("zsh", "tcsh"):
        out = io.StringIO()
        assert cli.main(["completion", shell], stdout=out) == 0
        assert "flowproof" in out.getvalue() and "--expectations" in out.getvalue()


def test_lab_up_takes_expectations_like_lab_test() -> None:
    parser = lab_cli.build_parser()
    up = parser.parse_args(["up", "-f", "a.yaml", "b/", "-e", "flows.yaml", "-f", "-"])
    test = parser.parse_args(["test", "-f", "a.yaml", "b/", "-e", "flows.yaml", "-f", "-"])
    for args in (up, test):
        assert args.filename == [["a.yaml", "b/"], ["-"]]
        assert args.expectations == [["flows.yaml"]]


def test_help_runs_for_every_delegated_command() -> None:
    env = {**os.environ, "COLUMNS": "100"}
    for command in ("lab", "verify", "collector", "agent"):
        done = subprocess.run(
            [sys.executable, "-m", "flowproof", command, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "Examples:" in done.stdout, command
