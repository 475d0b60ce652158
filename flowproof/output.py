"""What every command line of flowproof shares: the `-o` names, Examples sections, and leaving
quietly when a reader closes the pipe.

Owns OUTPUT_FORMATS (the same names on every command, as kubectl has them), `add_output_flag`,
`with_examples` (an Examples section under a command's help) and `quiet_broken_pipe`
(`flowproof … | head` ends without a traceback). It knows no command and evaluates nothing, and
imports nothing heavy: the agent's settings use it (YAML output is collector.core.reporting's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

OUTPUT_FORMATS: Final = ("table", "wide", "json", "yaml", "markdown")
"""Every `-o` name: `table` (the default, for people), `wide` (the same with more columns and
nothing cut), `json` and `yaml` (the same document), `markdown` (a report for a pull request)."""
EXIT_BROKEN_PIPE: Final = 141
"""The exit code of a command whose reader closed its output (128 + SIGPIPE, as a shell shows)."""

_FORMAT_HELP: Final = {
    "table": "table for people (default)",
    "wide": "table with more columns, nothing cut",
    "json": "JSON",
    "yaml": "YAML (the JSON document)",
    "markdown": "Markdown (a pull-request comment)",
}

P = TypeVar("P", bound=argparse.ArgumentParser)


def add_output_flag(
    parser: argparse.ArgumentParser,
    *,
    formats: Sequence[str] = OUTPUT_FORMATS,
    default: str = "table",
) -> None:
    """`-o/--output` with the given subset of OUTPUT_FORMATS (in its order)."""
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown:
        raise ValueError(f"not output formats: {', '.join(unknown)}")
    parser.add_argument(
        "-o",
        "--output",
        choices=tuple(formats),
        default=default,
        metavar="FORMAT",
        help="output format: " + ", ".join(f"{f} ({_FORMAT_HELP[f]})" for f in formats),
    )


def examples(*lines: tuple[str, str]) -> str:
    """An Examples section: (what it does, the command) per example."""
    body = "\n".join(f"  # {what}\n  {command}\n" for what, command in lines)
    return "Examples:\n" + body


def with_examples(parser: P, *lines: tuple[str, str]) -> P:
    """`parser` with an Examples section under its help, printed as written."""
    parser.epilog = examples(*lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    # The interpreter flushes stdout again at exit; point it at /dev/null so that flush cannot
    # fail a second time ("Exception ignored ... BrokenPipeError").
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
        yield
    finally:
        os.close(devnull)


def quiet_broken_pipe(run: Callable[[], int]) -> int:
    """Run a command line; when its reader closed the output (`| head`), end quietly with 141."""
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError), _stdout_to_devnull():
            pass
        return EXIT_BROKEN_PIPE
    return code


__all__ = [
    "EXIT_BROKEN_PIPE",
    "OUTPUT_FORMATS",
    "add_output_flag",
    "examples",
    "quiet_broken_pipe",
    "with_examples",
]
