"""`flowproof verify`: run every expectation now against a running collector and report.

The client of the collector's `POST /api/v1/verify` (collector/web/verify.py): it prints a table
grouped by status, writes JUnit, JSON and Markdown, and exits 0 when every expectation holds, 1 when
any fails, 2 when it could not decide (and then never says OK). Without `--collector` it finds the
running lab's collector. On a terminal it shows its progress on stderr (flows decided / total) while
it waits; in CI logs ($CI set) and when stderr is not a terminal it stays quiet. The route needs
the collector's token: `--token-file`, else FLOWPROOF_VERIFY_TOKEN(_FILE), else
FLOWPROOF_TOKEN(_FILE) (set in the collector's own container), else the lab's token file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from aiohttp import ClientError, ClientResponseError, ClientSession, ClientTimeout, TCPConnector

from collector.core.reporting import (
    render_json,
    render_junit,
    render_markdown,
    render_table,
    report_document,
    sort_rows,
    to_yaml,
)
from collector.core.statuses import FAILING, UNDECIDED
from collector.core.views import FlowView
from flowproof.errors import InputError
from flowproof.output import add_output_flag, with_examples
from lab.config import DEFAULT_NAME, DEFAULT_STATE_DIR
from lab.state import collector_token_file, collector_url

EXIT_OK, EXIT_FAILED, EXIT_UNDECIDED = 0, 1, 2
DEFAULT_COLLECTOR = "http://127.0.0.1:8080"
NDJSON: Final = "application/x-ndjson"
PROGRESS_MODES: Final = ("auto", "always", "never")


def exit_code(
    answer: Mapping[str, Any], rows: Sequence[FlowView], *, fail_on_not_enforced: bool = False
) -> int:
    if any(r.status in FAILING for r in rows):
        return EXIT_FAILED
    policies = answer.get("policies") or []
    if fail_on_not_enforced and any(p.get("status") == "NOT_ENFORCED" for p in policies):
        return EXIT_FAILED
    if not answer.get("decided") or not rows or any(r.status in UNDECIDED for r in rows):
        return EXIT_UNDECIDED
    return EXIT_OK


def default_collector_url(environ: Mapping[str, str], lab: str | None = None) -> str:
    """The lab's collector with `lab`; else FLOWPROOF_COLLECTOR_URL, else the running lab's
    collector (FLOWPROOF_LAB_NAME, default fp), else localhost:8080."""
    state_dir = environ.get("FLOWPROOF_LAB_STATE_DIR", DEFAULT_STATE_DIR)
    if lab is not None:
        return collector_url(lab, state_dir) or DEFAULT_COLLECTOR
    if environ.get("FLOWPROOF_COLLECTOR_URL"):
        return environ["FLOWPROOF_COLLECTOR_URL"]
    url = collector_url(environ.get("FLOWPROOF_LAB_NAME", DEFAULT_NAME), state_dir)
    return url or DEFAULT_COLLECTOR


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """The report files, `-o` and `--progress` of a verification."""
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    parser.add_argument("--json", dest="json_file", metavar="FILE", help="also write JSON here")
    parser.add_argument("--markdown", metavar="FILE", help="also write Markdown here")
    add_output_flag(parser)
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="show flows decided / total on stderr while waiting: auto (on a terminal, not in "
        "CI), always, never",
    )


def lab_token_file(environ: Mapping[str, str], lab: str | None = None) -> str | None:
    """The token file of the lab's collector (`lab`, else the running lab `verify` finds
    without flags)."""
    return collector_token_file(
        lab or environ.get("FLOWPROOF_LAB_NAME", DEFAULT_NAME),
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
    with_examples(
        parser,
        ("the CI gate against the running lab (or $FLOWPROOF_COLLECTOR_URL)",
         "flowproof verify --once --junit verify.xml"),
        ("in a cluster, from inside the leading collector's pod (the Lease's holder)",
         "kubectl -n flowproof exec pod/$(kubectl -n flowproof get lease flowproof-collector "
         "-o jsonpath='{.spec.holderIdentity}') -- flowproof verify --once"),
        ("through a port-forward, as a pull-request comment",
         "flowproof verify --once --collector http://localhost:8080 -o markdown"),
        ("the lab named demo, failing on a policy that is not enforced",
         "flowproof verify --once --lab demo --fail-on-not-enforced"),
        ("keep verifying every minute", "flowproof verify --interval 60"),
    )  # fmt: skip
    parser.add_argument(
        "--collector",
        metavar="URL",
        help="collector URL (default: $FLOWPROOF_COLLECTOR_URL, the lab's, or localhost:8080)",
    )
    parser.add_argument(
        "--lab", metavar="NAME", help="the collector of this running lab (`flowproof lab --name`)"
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="the collector's token (default: FLOWPROOF_VERIFY_TOKEN(_FILE), FLOWPROOF_TOKEN(_FILE),"
        " or the lab's)",
    )
    parser.add_argument("--once", action="store_true", help="verify once and exit (the CI gate)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the collector may take to decide every flow (default 60)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="without --once: seconds between rounds (default 30)",
    )
    add_report_flags(parser)
    parser.add_argument(
        "--fail-on-not-enforced",
        action="store_true",
        help="exit 1 also when a NetworkPolicy is NOT_ENFORCED (a witness contradicts it), and 2 "
        "when a policy's witnesses could not all be probed in time",
    )
    parser.add_argument(
        "--no-evidence",
        dest="evidence",
        action="store_false",
        help="verify the declared flows only, not every policy's witnesses",
    )
    return parser


def show_progress(mode: str, stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether to show progress: `always`, `never`, or (auto) on a terminal outside CI."""
    if mode != "auto":
        return mode == "always"
    return stream.isatty() and not environ.get("CI")


class ProgressLine:
    """One line on a terminal, rewritten in place: `verify: 12/40 flows decided (3.1 s)`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False

    def update(self, progress: Mapping[str, Any]) -> None:
        phase, elapsed = progress.get("phase"), progress.get("elapsed", 0)
        if phase == "probing":
            text = f"{progress.get('decided', 0)}/{progress.get('total', 0)} flows decided"
        elif phase == "agents":
            text = "waiting for agents and probe pods"
        else:
            text = "waiting for the collector's inventory"
        self.stream.write(f"\r\x1b[Kverify: {text} ({elapsed} s)")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


STANDBY_TRIES: Final = 10
"""Answers from standby collectors taken before giving up (each try on a new connection)."""


class CollectorStandby(Exception):
    """Every try reached a standby collector (leader election: another replica leads)."""


async def request_verification(
    url: str,
    timeout_seconds: float,
    *,
    evidence: bool = True,
    require_evidence: bool = False,
    on_progress: Callable[[Mapping[str, Any]], None] | None = None,
    token: str = "",
) -> dict[str, Any]:
    """The collector's answer; with `on_progress`, asked as a stream of progress lines.

    A standby collector answers 503: asked again (at most STANDBY_TRIES times, within the
    timeout) on a new connection each time, which a Service may route to the leader;
    CollectorStandby when every try reached a standby.
    """
    deadline = time.monotonic() + timeout_seconds
    why = ""
    for _ in range(STANDBY_TRIES):
        answer, why = await _request_once(
            url, timeout_seconds, evidence, require_evidence, on_progress, token
        )
        if answer is not None:
            return answer
        wait = min(2.0, max(deadline - time.monotonic(), 0.0))
        if wait <= 0:
            break
        await asyncio.sleep(wait)
    raise CollectorStandby(why)


async def _request_once(
    url: str,
    timeout_seconds: float,
    evidence: bool,
    require_evidence: bool,
    on_progress: Callable[[Mapping[str, Any]], None] | None,
    token: str,
) -> tuple[dict[str, Any] | None, str]:
    """(the answer, "") or, from a standby, (None, what it said)."""
    client_timeout = ClientTimeout(total=timeout_seconds + 30)
    headers = {"Accept": NDJSON} if on_progress is not None else {}
    async with (
        ClientSession(timeout=client_timeout, connector=TCPConnector(force_close=True)) as session,
        session.post(
            f"{url.rstrip('/')}/api/v1/verify",
            json={
                "timeout_seconds": timeout_seconds,
                "evidence": evidence,
                "require_evidence": require_evidence,
            },
            headers=headers | ({"Authorization": f"Bearer {token}"} if token else {}),
        ) as resp,
    ):
        if resp.status == 503:
            with contextlib.suppress(ValueError, ClientError):
                error = str((await resp.json(content_type=None)).get("error", ""))
                if "standby" in error:
                    return None, error
        resp.raise_for_status()
        if on_progress is None or NDJSON not in resp.headers.get("Content-Type", ""):
            answer: dict[str, Any] = await resp.json(content_type=None)
            return answer, ""
        async for raw in resp.content:
            if not raw.strip():
                continue
            line = json.loads(raw)
            if "progress" in line:
                on_progress(line["progress"])
            elif "answer" in line:
                found: dict[str, Any] = line["answer"]
                return found, ""
        raise json.JSONDecodeError("the stream ended without an answer", "", 0)


@dataclass(frozen=True)
class Outputs:
    """Where a verification's report goes: stdout in one format, and files."""

    output: str = "table"
    junit: str | None = None
    json_file: str | None = None
    markdown: str | None = None
    fail_on_not_enforced: bool = False
    evidence: bool = True
    progress: bool = False
    """Show flows decided / total on stderr while waiting (show_progress decides)."""


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
    """Print the answer as asked, write the report files; the exit code (which the summary line
    agrees with: never OK when it is 2)."""
    data = [r for r in answer.get("rows", []) if isinstance(r, dict)]
    rows = sort_rows(FlowView.from_json(r) for r in data)
    details = {str(r["key"]): r for r in data}
    problems = answer.get("reasons", [])
    policies = [p for p in answer.get("policies", []) if isinstance(p, dict)]
    code = exit_code(answer, rows, fail_on_not_enforced=outputs.fail_on_not_enforced)
    decided = code != EXIT_UNDECIDED

    def table(wide: bool) -> str:
        return render_table(rows, with_reality=True, policies=policies, wide=wide, decided=decided)

    def document() -> dict[str, Any]:
        return report_document(
            rows, problems=problems, details=details, policies=policies, decided=decided
        )

    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: table(False),
        "wide": lambda: table(True),
        "json": lambda: render_json(
            rows, problems=problems, details=details, policies=policies, decided=decided
        ),
        "yaml": lambda: to_yaml(document()),
        "markdown": lambda: render_markdown(
            rows, title="flowproof verify", with_reality=True, policies=policies, decided=decided
        ),
    }
    print(renderers[outputs.output]())
    for reason in problems:
        print(f"undecided: {reason}", file=sys.stderr)
    files: list[tuple[str, str | None, Callable[[], str]]] = [
        (
            "--junit",
            outputs.junit,
            lambda: render_junit(rows, name="flowproof verify", policies=policies),
        ),
        ("--json", outputs.json_file, renderers["json"]),
        ("--markdown", outputs.markdown, renderers["markdown"]),
    ]
    for flag, path, render in files:
        if path:
            write_report_file(path, render(), flag)
    return code


def fetch_answer(
    url: str, timeout_seconds: float, outputs: Outputs, token: str = ""
) -> dict[str, Any] | None:
    """The collector's answer, or None (said on stderr) when it cannot be had. With
    `outputs.progress`, flows decided / total are shown on stderr while it waits."""
    line = ProgressLine(sys.stderr) if outputs.progress else None
    try:
        return asyncio.run(
            request_verification(
                url,
                timeout_seconds,
                evidence=outputs.evidence,
                require_evidence=outputs.fail_on_not_enforced,
                on_progress=line.update if line is not None else None,
                token=token,
            )
        )
    except ClientResponseError as exc:
        if line is not None:
            line.clear()
        if exc.status == 401:
            given = "the token given was refused" if token else "no token was given"
            print(
                f"flowproof verify: the collector at {url} needs its token ({given}): use "
                "--token-file or FLOWPROOF_VERIFY_TOKEN(_FILE)",
                file=sys.stderr,
            )
        else:
            print(f"flowproof verify: the collector at {url} answered {exc}", file=sys.stderr)
    except CollectorStandby as exc:
        if line is not None:
            line.clear()
        print(
            f"flowproof verify: every answer from {url} came from a standby collector ({exc}); "
            "run verify on the leader: kubectl -n flowproof exec pod/$(kubectl -n flowproof get "
            "lease flowproof-collector -o jsonpath='{.spec.holderIdentity}') -- flowproof verify "
            "--once",
            file=sys.stderr,
        )
    except (ClientError, OSError, TimeoutError) as exc:
        if line is not None:
            line.clear()
        print(f"flowproof verify: cannot reach the collector at {url}: {exc}", file=sys.stderr)
    except json.JSONDecodeError as exc:
        if line is not None:
            line.clear()
        print(f"flowproof verify: the collector at {url} answered no JSON: {exc}", file=sys.stderr)
    finally:
        if line is not None:
            line.clear()
    return None


def verify_once(url: str, *, timeout_seconds: float, outputs: Outputs, token: str) -> int:
    """Ask the collector at `url` to verify every expectation now; report; the exit code."""
    answer = fetch_answer(url, timeout_seconds, outputs, token)
    return EXIT_UNDECIDED if answer is None else report(answer, outputs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    url = args.collector or default_collector_url(os.environ, args.lab)
    if args.lab is not None and url == DEFAULT_COLLECTOR and not args.collector:
        print(f"flowproof verify: lab {args.lab!r} is not running a collector", file=sys.stderr)
        return EXIT_UNDECIDED
    outputs = Outputs(
        args.output,
        args.junit,
        args.json_file,
        args.markdown,
        fail_on_not_enforced=args.fail_on_not_enforced,
        evidence=args.evidence,
        progress=show_progress(args.progress, sys.stderr, os.environ),
    )
    try:
        return _verify(url, args, outputs)
    except InputError as exc:
        print(f"flowproof verify: error: {exc}", file=sys.stderr)
        return EXIT_UNDECIDED


def _verify(url: str, args: argparse.Namespace, outputs: Outputs) -> int:
    check_output_files(output_flags(outputs))
    lab_file = (
        None
        if args.collector or (os.environ.get("FLOWPROOF_COLLECTOR_URL") and args.lab is None)
        else lab_token_file(os.environ, args.lab)
    )
    token = read_token(args.token_file, os.environ, lab_file)
    while True:
        answer = fetch_answer(url, args.timeout, outputs, token)
        if answer is None:
            return EXIT_UNDECIDED
        code = report(answer, outputs)
        if args.once:
            return code
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return code
