"""Manifest files: which files a path names, read as Documents and into one Snapshot.

Owns file discovery (files as given, directories walked in sorted order, hidden entries and
kustomization files skipped) and `load_snapshot`, which reports every problem of every file at
once. Parsing is collector.reading.documents'; conversion is collector.reading.objects'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from collector.core.model import Snapshot
from collector.reading.documents import Document, read_documents
from collector.reading.fields import raise_problems
from collector.reading.objects import build_snapshot
from flowproof.errors import InputError

log = logging.getLogger(__name__)


MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
KUSTOMIZATION_FILES: Final = frozenset({"kustomization.yaml", "kustomization.yml", "Kustomization"})


# --- Kubernetes syntax (k8s.io/apimachinery/pkg/util/validation) ----------------------------------


# --- documents ------------------------------------------------------------------------------------


def _manifest_files(
    paths: Sequence[str | os.PathLike[str]], problems: list[InputError]
) -> list[tuple[Path, str]]:
    """(path, label) of every file to read: given files as given, directories walked and sorted."""
    files: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(path: Path, label: str) -> None:
        resolved = path.resolve()
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
        elif path.exists():
            add(path, label)
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
            data = path.read_bytes()
        except OSError as exc:
            problems.append(InputError(f"cannot read: {exc.strerror or exc}", file=label))
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
