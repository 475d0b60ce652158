"""`flowproof verify`: run every expectation now against a running collector and report.

The client of the collector's `POST /api/v1/verify` (collector/web/verify.py): it prints a table
grouped by status, writes JUnit, JSON and Markdown, and exits 0 when every expectation holds, 1 when
any fails, 2 when it could not decide. Without `--collector` it finds the running lab's collector.
The route needs the collector's token: `--token-file`, else FLOWPROOF_VERIFY_TOKEN(_FILE), else
FLOWPROOF_TOKEN(_FILE) (set in the collector's own container), else the lab's token file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientResponseError, ClientSession, ClientTimeout

from collector.core.reporting import (
    render_json,
    render_junit,
    render_markdown,
    render_table,
    sort_rows,
)
from collector.core.statuses import FAILING, UNDECIDED
from collector.core.views import FlowView
from flowproof.errors import InputError
from lab.config import DEFAULT_NAME, DEFAULT_STATE_DIR
from lab.state import collector_token_file, collector_url

EXIT_OK, EXIT_FAILED, EXIT_UNDECIDED = 0, 1, 2
DEFAULT_COLLECTOR = "http://127.0.0.1:8080"


def exit_code(answer: Mapping[str, Any], rows: Sequence[FlowView]) -> int:
    if any(r.status in FAILING for r in rows):
        return EXIT_FAILED
    if not answer.get("decided") or not rows or any(r.status in UNDECIDED for r in rows):
        return EXIT_UNDECIDED
    return EXIT_OK


def default_collector_url(environ: Mapping[str, str]) -> str:
    """FLOWPROOF_COLLECTOR_URL, else the running lab's collector, else localhost:8080."""
    if environ.get("FLOWPROOF_COLLECTOR_URL"):
        return environ["FLOWPROOF_COLLECTOR_URL"]
    url = collector_url(
        environ.get("FLOWPROOF_LAB_NAME", DEFAULT_NAME),
        environ.get("FLOWPROOF_LAB_STATE_DIR", DEFAULT_STATE_DIR),
    )
    return url or DEFAULT_COLLECTOR


def lab_token_file(environ: Mapping[str, str]) -> str | None:
    """The token file of the running lab's collector (the lab `verify` finds without flags)."""
    return collector_token_file(
        environ.get("FLOWPROOF_LAB_NAME", DEFAULT_NAME),
        environ.get("FLOWPROOF_LAB_STATE_DIR", DEFAULT_STATE_DIR),
    )


def read_token(token_file: str | None, environ: Mapping[str, str], lab_file: str | None) -> str:
    """The bearer token for the verify route (see the module docstring for the order); "" when
    none is given (the collector then refuses, and says so)."""
    sources: list[tuple[str, str | None, bool]] = [
        ("--token-file", token_file, True),
        ("FLOWPROOF_VERIFY_TOKEN", environ.get("FLOWPROOF_VERIFY_TOKEN"), False),
        ("FLOWPROOF_VERIFY_TOKEN_FILE", environ.get("FLOWPROOF_VERIFY_TOKEN_FILE"), True),
        ("FLOWPROOF_TOKEN", environ.get("FLOWPROOF_TOKEN"), False),
        ("FLOWPROOF_TOKEN_FILE", environ.get("FLOWPROOF_TOKEN_FILE"), True),
        ("the lab's token file", lab_file, True),
    ]
    for name, value, is_file in sources:
        if not value:
            continue
        if not is_file:
            return value.strip()
        try:
            return Path(value).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(
                f"cannot read the token file {value!r}: {exc.strerror or exc}", field=name
            ) from exc
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowproof verify",
        description="Run every expectation now against a running collector; exit 0 pass, "
        "1 a failure, 2 undecided (no agents, timeout, inconclusive flows).",
    )
    parser.add_argument("--collector", help="collector URL (default: the lab's, or localhost:8080)")
    parser.add_argument("--once", action="store_true", help="verify once and exit (the CI gate)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    parser.add_argument(
        "--interval", type=float, default=30.0, help="without --once: seconds between rounds"
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the collector's token (default: FLOWPROOF_VERIFY_TOKEN(_FILE), FLOWPROOF_TOKEN(_FILE),"
        " or the lab's)",
    )
    parser.add_argument("--junit", metavar="FILE")
    parser.add_argument("--json", dest="json_file", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("-o", "--output", choices=("table", "json", "markdown"), default="table")
    return parser


async def request_verification(url: str, timeout_seconds: float, token: str) -> dict[str, Any]:
    client_timeout = ClientTimeout(total=timeout_seconds + 30)
    async with (
        ClientSession(timeout=client_timeout) as session,
        session.post(
            f"{url.rstrip('/')}/api/v1/verify",
            json={"timeout_seconds": timeout_seconds},
            headers={"Authorization": f"Bearer {token}"} if token else {},
        ) as resp,
    ):
        resp.raise_for_status()
        answer: dict[str, Any] = await resp.json()
        return answer


@dataclass(frozen=True)
class Outputs:
    """Where a verification's report goes: stdout in one format, and files."""

    output: str = "table"
    junit: str | None = None
    json_file: str | None = None
    markdown: str | None = None


def check_output_files(files: Mapping[str, str | None]) -> None:
    """InputError (by flag) for a report file that cannot be written: checked before any work is
    done, so a typo in `--junit` never costs a verification (or a lab) and ends in a traceback."""
    for flag, path in files.items():
        if not path:
            continue
        target = Path(path)
        parent = target.parent
        if target.is_dir():
            reason = "is a directory"
        elif not parent.is_dir():
            reason = f"cannot be written: no directory {str(parent)!r}"
        elif not os.access(parent, os.W_OK):
            reason = f"cannot be written: {str(parent)!r} is not writable"
        else:
            continue
        raise InputError(f"{path!r} {reason}", field=flag)


def write_report_file(path: str, text: str, flag: str) -> None:
    """Write one report file; InputError naming the flag when it cannot be written."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path!r} cannot be written: {exc.strerror or exc}", field=flag) from exc


def output_flags(outputs: Outputs) -> dict[str, str | None]:
    return {"--junit": outputs.junit, "--json": outputs.json_file, "--markdown": outputs.markdown}


def report(answer: dict[str, Any], outputs: Outputs) -> int:
    """Print the answer as asked, write the report files; the exit code."""
    data = [r for r in answer.get("rows", []) if isinstance(r, dict)]
    rows = sort_rows(FlowView.from_json(r) for r in data)
    details = {str(r["key"]): r for r in data}
    problems = answer.get("reasons", [])
    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: render_table(rows, with_reality=True),
        "json": lambda: render_json(rows, problems=problems, details=details),
        "markdown": lambda: render_markdown(rows, title="flowproof verify", with_reality=True),
    }
    print(renderers[outputs.output]())
    for reason in problems:
        print(f"undecided: {reason}", file=sys.stderr)
    files: list[tuple[str, str | None, Callable[[], str]]] = [
        ("--junit", outputs.junit, lambda: render_junit(rows, name="flowproof verify")),
        (
            "--json",
            outputs.json_file,
            lambda: render_json(rows, problems=problems, details=details),
        ),
        ("--markdown", outputs.markdown, renderers["markdown"]),
    ]
    for flag, path, render in files:
        if path:
            write_report_file(path, render(), flag)
    return exit_code(answer, rows)


def fetch_answer(url: str, timeout_seconds: float, token: str) -> dict[str, Any] | None:
    """The collector's answer, or None (said on stderr) when it cannot be had."""
    try:
        return asyncio.run(request_verification(url, timeout_seconds, token))
    except ClientResponseError as exc:
        if exc.status == 401:
            given = "the token given was refused" if token else "no token was given"
            print(
                f"flowproof verify: the collector at {url} needs its token ({given}): use "
                "--token-file or FLOWPROOF_VERIFY_TOKEN(_FILE)",
                file=sys.stderr,
            )
        else:
            print(f"flowproof verify: the collector at {url} answered {exc}", file=sys.stderr)
    except (ClientError, OSError, TimeoutError) as exc:
        print(f"flowproof verify: cannot reach the collector at {url}: {exc}", file=sys.stderr)
    except json.JSONDecodeError as exc:
        print(f"flowproof verify: the collector at {url} answered no JSON: {exc}", file=sys.stderr)
    return None


def verify_once(url: str, *, timeout_seconds: float, outputs: Outputs, token: str) -> int:
    """Ask the collector at `url` to verify every expectation now; report; the exit code."""
    answer = fetch_answer(url, timeout_seconds, token)
    return EXIT_UNDECIDED if answer is None else report(answer, outputs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    url = args.collector or default_collector_url(os.environ)
    outputs = Outputs(args.output, args.junit, args.json_file, args.markdown)
    try:
        return _verify(url, args, outputs)
    except InputError as exc:
        print(f"flowproof verify: error: {exc}", file=sys.stderr)
        return EXIT_UNDECIDED


def _verify(url: str, args: argparse.Namespace, outputs: Outputs) -> int:
    check_output_files(output_flags(outputs))
    lab_file = (
        None
        if args.collector or os.environ.get("FLOWPROOF_COLLECTOR_URL")
        else (lab_token_file(os.environ))
    )
    token = read_token(args.token_file, os.environ, lab_file)
    while True:
        answer = fetch_answer(url, args.timeout, token)
        if answer is None:
            return EXIT_UNDECIDED
        code = report(answer, outputs)
        if args.once:
            return code
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return code
