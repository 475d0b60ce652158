"""Manifest files: which files a path names, read as Documents and into one Snapshot.

Owns file discovery (files as given, directories walked in sorted order, hidden entries and
kustomization files skipped), reading a file safely (`read_manifest_file`: regular files only,
never more than the size bound, a FIFO never waited on) and `load_snapshot`, which reports every
problem of every file at once. Parsing is collector.reading.documents'; conversion is
collector.reading.objects'.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from collector.core.model import Snapshot
from collector.reading import documents as reading_documents
from collector.reading.documents import Document, read_documents
from collector.reading.fields import raise_problems
from collector.reading.objects import build_snapshot
from flowproof.errors import InputError

log = logging.getLogger(__name__)


MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
KUSTOMIZATION_FILES: Final = frozenset({"kustomization.yaml", "kustomization.yml", "Kustomization"})


MAX_FILE_BYTES = reading_documents.MAX_DOCUMENT_BYTES
"""The largest manifest file read (the reader's own bound on one input)."""

_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


# --- files ----------------------------------------------------------------------------------------


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


# --- documents ------------------------------------------------------------------------------------


def _manifest_files(
    paths: Sequence[str | os.PathLike[str]], problems: list[InputError]
) -> list[tuple[Path, str]]:
    """(path, label) of every file to read: given files as given, directories walked and sorted."""
    files: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(path: Path, label: str) -> None:
        resolved = Path(os.path.realpath(path))  # never raises, also on a symlink loop
        if resolved not in seen:
            seen.add(resolved)
            files.append((path, label))

    for raw in paths:
        path = Path(raw)
        label = os.fspath(raw)
        if path.is_dir():
            found: list[Path] = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in names:
                    if name.startswith(".") or name in KUSTOMIZATION_FILES:
                        continue
                    if name.endswith(MANIFEST_SUFFIXES):
                        found.append(Path(root, name))
            if not found:
                problems.append(
                    InputError("no *.yaml, *.yml or *.json manifest in this directory", file=label)
                )
            for file in sorted(found):
                add(file, os.path.join(label, os.path.relpath(file, path)))
        elif os.path.lexists(path):
            add(path, label)  # anything but a regular file is refused when it is read
        else:
            problems.append(InputError("no such file or directory", file=label))
    return files


def _load_documents(
    paths: Sequence[str | os.PathLike[str]], problems: list[InputError], files: list[str]
) -> list[Document]:
    documents: list[Document] = []
    for path, label in _manifest_files(paths, problems):
        files.append(label)
        try:
            data = read_manifest_file(path, label)
        except InputError as exc:
            problems.append(exc)
            continue
        documents += read_documents(data, label, problems)
    return documents


def load_documents(paths: Sequence[str | os.PathLike[str]]) -> list[Document]:
    """Every object in the files and directories (recursive, sorted) given; raises InputError.

    Reads `*.yaml`, `*.yml` and `*.json` under directories (skipping hidden entries and
    kustomization files) and any file named explicitly; multi-document YAML and List items become
    one Document each. Kinds are not checked here: see `snapshot_from_documents`.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files)
    raise_problems(problems, files)
    return documents


# --- the snapshot ---------------------------------------------------------------------------------


def load_snapshot(paths: Sequence[str | os.PathLike[str]]) -> Snapshot:
    """Read manifests (files, directories, multi-document YAML, Lists) into a snapshot.

    Raises one InputError carrying every problem of every file; no snapshot is made from a
    partly bad input.
    """
    problems: list[InputError] = []
    files: list[str] = []
    documents = _load_documents(paths, problems, files)
    snapshot = build_snapshot(documents, problems)
    raise_problems(problems, files)
    return snapshot
