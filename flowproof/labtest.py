"""`flowproof lab test` (front door): up, verify, down in one command — a team's manifests proven with real
packets in CI, with no cluster.

Owns the lab of one test run: a fresh unique name, owned by this process (if it is killed, the
lab's supervisor takes the lab down), the verify client against its collector, and `down`
always (also on failure, Ctrl-C or SIGTERM). Exit code: verify's (0 every expectation holds,
1 one fails, 2 undecided or the lab could not be built; 130 interrupted). It changes no other lab.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

from flowproof import verifying
from flowproof.errors import InputError
from lab.config import LabSettings
from lab.errors import LabError
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings

EXIT_UNDECIDED, EXIT_INTERRUPTED = 2, 130


def unique_name() -> str:
    """A lab name no other run picks: `ci` and six random hex digits."""
    return "ci" + secrets.token_hex(3)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a cancelled CI job) unwinds like Ctrl-C, so `down` still runs."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the lab is taken down (a second Ctrl-C must not leave
    half a lab behind)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_lab_test(args: argparse.Namespace) -> int:
    verifying.check_output_files(
        {"--junit": args.junit, "--json": args.json_file, "--markdown": args.markdown}
    )
    files = [p for group in args.filename for p in group]
    files += [p for group in args.expectations for p in group]
    manifests = read_manifests(files)  # InputError: nothing is built
    if not manifests.expectations:
        raise InputError(
            "no FlowExpectations among the files: give them with -e", field="--expectations"
        )
    loop = LoopSettings.with_planner(
        probe_timeout_seconds=args.probe_timeout_seconds,
        interval_seconds=args.interval_seconds,
        freshness_seconds=args.freshness_seconds,
        sweep_probes_per_second=args.sweep_probes_per_second,
    ).validate()
    lab = Lab(unique_name(), args.state_dir)
    settings = LabSettings(name=lab.name, nodes=args.nodes, owner_pid=os.getpid())
    started = time.monotonic()
    try:
        with _sigterm_interrupts():
            print(f"lab test: building lab {lab.name}", file=sys.stderr)
            lab.up(manifests, settings, loop)
            state = lab.state()
            assert state.loop is not None
            print(
                f"lab test: lab {lab.name} up in {time.monotonic() - started:.1f}s "
                f"({len(state.pods)} pods, collector {state.loop.url}); verifying",
                file=sys.stderr,
            )
            outputs = verifying.Outputs(
                output=args.output,
                junit=args.junit,
                json_file=args.json_file,
                markdown=args.markdown,
                fail_on_not_enforced=args.fail_on_not_enforced,
                progress=verifying.show_progress(args.progress, sys.stderr, os.environ),
            )
            token = verifying.read_token(None, {}, state.loop.token_file)
            return verifying.verify_once(
                state.loop.url,
                timeout_seconds=args.timeout,
                outputs=outputs,
                token=token,
            )
    except KeyboardInterrupt:
        print("lab test: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LabError as exc:
        print(f"lab test: the lab could not run: {exc}", file=sys.stderr)
        return EXIT_UNDECIDED
    finally:
        with _uninterruptible():
            if lab.exists():
                try:
                    lab.down()
                    print(f"lab test: lab {lab.name} is down", file=sys.stderr)
                except LabError as exc:  # said loudly; the owner watch removes it when we exit
                    print(
                        f"lab test: could not take lab {lab.name} down: {exc}; "
                        f"run `flowproof lab --name {lab.name} down`",
                        file=sys.stderr,
                    )
