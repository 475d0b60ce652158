"""YAML and JSON documents with line marks: the one reader for files and ConfigMaps alike.

Owns the safe loader that reports duplicate keys (kubectl rejects them, PyYAML hides them), line
lookup for any field path, the bounds every input is held to (its size, its number of documents,
the nesting and alias expansion of each document: `check_size`, `check_document_count`,
`check_node`, called before a document is constructed) and the split of a text into Documents
(multi-document YAML, `List` items). Kinds and fields are not checked here: see
collector.reading.objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from collector.reading.fields import FieldPath, Where, describe_type, render_field
from flowproof.errors import InputError

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml: correct, several times slower
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


_CLUSTER_SCOPED: Final = frozenset({"Namespace"})

MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
"""The largest text read as one input (a file, a ConfigMap value): 32 MiB, about 80,000 pods."""
MAX_DOCUMENTS = 100_000
"""The most documents one input may hold."""
MAX_DEPTH = 200
"""The deepest nesting of mappings and lists in a document (Kubernetes objects stay below 30)."""
ALIAS_EXPANSION_SLACK = 10_000
"""Aliases may add at most this many nodes beyond the document's own (merge keys and shared
label sets need a few); an alias bomb adds millions from a few lines."""


# --- bounds, checked at the entry points before anything is constructed ---------------------------


def check_size(data: bytes, file: str) -> InputError | None:
    """A problem when `data` is larger than MAX_DOCUMENT_BYTES."""
    if len(data) <= MAX_DOCUMENT_BYTES:
        return None
    return InputError(
        f"larger than {MAX_DOCUMENT_BYTES} bytes ({len(data)}): split it into several files",
        file=file,
    )


def check_document_count(index: int, node: yaml.Node, file: str) -> InputError | None:
    """A problem when the `index`-th document (from 1) is one more than MAX_DOCUMENTS."""
    if index <= MAX_DOCUMENTS:
        return None
    return InputError(
        f"more than {MAX_DOCUMENTS} documents: split the input into several files",
        file=file,
        line=node.start_mark.line + 1,
        document=index,
    )


def check_node(node: yaml.Node, file: str, index: int) -> InputError | None:
    """A problem when a composed document nests deeper than MAX_DEPTH, refers to itself, or
    whose aliases expand it by more than ALIAS_EXPANSION_SLACK nodes (an alias bomb).

    One pass over the composed graph, where an alias is the anchored node itself: each node's
    expanded size is counted once (memoised), so a bomb is measured without being expanded.
    """
    line = node.start_mark.line + 1

    def problem(reason: str) -> InputError:
        return InputError(reason, file=file, line=line, document=index)

    expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    depth = 0
    while stack:
        current, done = stack.pop()
        key = id(current)
        children = _children(current)
        if done:
            on_path.discard(key)
            depth -= 1
            expanded[key] = 1 + sum(expanded[id(c)] for c in children)
            continue
        if key in expanded:
            continue
        if key in on_path:
            return problem("an alias refers to a node that contains it (a recursive document)")
        on_path.add(key)
        depth += 1
        if depth > MAX_DEPTH:
            return problem(f"nested deeper than {MAX_DEPTH} levels")
        stack.append((current, True))
        stack.extend((child, False) for child in children if id(child) not in expanded)
    own = len(expanded)
    total = expanded[id(node)]
    if total > own + ALIAS_EXPANSION_SLACK:
        return problem(
            f"its aliases expand it to {total} nodes from the {own} written: aliases may add at "
            f"most {ALIAS_EXPANSION_SLACK} (an alias bomb?); write the values out instead"
        )
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _node_line(node: yaml.Node, path: FieldPath) -> int:
    """The 1-based line of the deepest part of `path` found under `node` (a key's own line)."""
    line: int = node.start_mark.line + 1
    current: yaml.Node = node
    for step in path:
        if isinstance(current, yaml.MappingNode) and isinstance(step, str):
            # The last occurrence wins, as it does when the mapping is constructed.
            for key, value in reversed(current.value):
                if isinstance(key, yaml.ScalarNode) and key.value == step:
                    line = key.start_mark.line + 1
                    current = value
                    break
            else:
                return line
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(step, int)
            and 0 <= step < len(current.value)
        ):
            current = current.value[step]
            line = current.start_mark.line + 1
        else:
            return line
    return line


class LineFinder:
    """Finds the line of a field in one file, composing the file's YAML again when first asked.

    Keeping every node of a large input while reading it costs seconds and hundreds of MB; lines
    of fields are only needed for problems, which are few.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._roots: list[yaml.Node] | None = None

    def line(self, document: int, path: FieldPath) -> int | None:
        """The line of `path` in the `document`-th document (from 1), or None if unknown."""
        if self._roots is None:
            self._roots = []
            loader = _SafeLoader(self._data)
            try:
                while loader.check_node() and (node := loader.get_node()) is not None:
                    self._roots.append(node)
            except yaml.YAMLError:
                pass  # the read reported it; the documents before it still have lines
            finally:
                loader.dispose()
        if 1 <= document <= len(self._roots):
            return _node_line(self._roots[document - 1], path)
        return None


@dataclass(frozen=True)
class Document:
    """One object read from a file: a document, or one item of a `kind: List` document.

    `index` counts the documents of the file from 1; `line` is where the object starts.
    """

    obj: Mapping[str, Any]
    file: str
    index: int
    line: int
    prefix: FieldPath = ()  # the object's path inside its document, e.g. ("items", 3)
    lines: LineFinder | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> Where:
        return Where(self.file, self.index, self.line, self.prefix, self.lines)

    def line_of(self, path: FieldPath) -> int:
        """The line of the field at `path`, or of its nearest present ancestor."""
        return self.where.line(path) or self.line

    @property
    def kind(self) -> str:
        kind = self.obj.get("kind")
        return kind if isinstance(kind, str) else ""

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name), the identity the API gives an object; namespace "" if none."""
        meta = self.obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name")
        namespace = meta.get("namespace") or "default"
        if self.kind in _CLUSTER_SCOPED:
            namespace = ""
        return self.kind, str(namespace), str(name) if name is not None else ""


_STR: Final = "tag:yaml.org,2002:str"
_MAP: Final = "tag:yaml.org,2002:map"
_SEQ: Final = "tag:yaml.org,2002:seq"
_MERGE: Final = "tag:yaml.org,2002:merge"
_VALUE: Final = "tag:yaml.org,2002:value"
# Scalar tags whose safe constructors are plain functions of the node (no generator states).
_SCALARS: Final = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp")
)


class _Slow(Exception):
    """The document needs PyYAML's full constructor: an alias, a merge key, a rare tag, an
    unhashable key or a depth beyond the fast path's recursion."""


class _Loader(_SafeLoader):
    """A safe loader that records duplicate mapping keys, which kubectl rejects and PyYAML hides.

    libyaml (C) composes the nodes; `construct_fast` builds the objects of a plain document
    (mappings, sequences, the safe scalar tags, no aliases or merge keys: every manifest we have
    seen) directly from them, four to five times faster than PyYAML's generic constructor, and
    falls back to that constructor for anything else, so the result is always the same.
    """

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, line, first line)

    def construct_fast(self, node: yaml.Node) -> Any:
        """The document's object, as `construct_document` would build it."""
        found = len(self.duplicates)
        try:
            return self._build(node, set())
        except (_Slow, RecursionError):
            del self.duplicates[found:]  # the full constructor finds them again
            return self.construct_document(node)

    def _build(self, node: yaml.Node, seen: set[int]) -> Any:
        kind = type(node)
        tag = node.tag
        if kind is yaml.ScalarNode:
            if tag == _STR:
                return node.value
            if tag in _SCALARS:
                return self.yaml_constructors[tag](self, node)
            raise _Slow
        if id(node) in seen:
            raise _Slow  # an alias: PyYAML shares the object (and may recurse)
        seen.add(id(node))
        if kind is yaml.SequenceNode and tag == _SEQ:
            return [self._build(item, seen) for item in node.value]
        if not isinstance(node, yaml.MappingNode) or tag != _MAP:
            raise _Slow
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if type(key_node) is not yaml.ScalarNode or key_node.tag in (_MERGE, _VALUE):
                raise _Slow
            mapping[self._build(key_node, seen)] = self._build(value_node, seen)
        if len(mapping) != len(node.value):
            self._find_duplicates(node)
        return mapping

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(node.value):
            self._find_duplicates(node)
        return mapping

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or a marked error for one too long to convert (Python's digit limit)."""
        try:
            value: int = self.construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer of {len(node.value)} characters is too long",
                node.start_mark,
            ) from None
        return value

    def _find_duplicates(self, node: yaml.MappingNode) -> None:
        # Keys merged in with `<<` come from an anchor outside this node's span and may be
        # overridden; only keys written inside the node count.
        start, end = node.start_mark.index, node.end_mark.index
        first: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or not start <= key.start_mark.index <= end:
                continue
            line = key.start_mark.line + 1
            if key.value in first:
                self.duplicates.append((key.value, line, first[key.value]))
            else:
                first[key.value] = line


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_bounded_int)


def _expand(
    obj: object,
    node: yaml.Node,
    file: str,
    index: int,
    prefix: FieldPath,
    lines: LineFinder,
    problems: list[InputError],
) -> list[Document]:
    """The objects of one document: the document itself, or the items of a (typed) List."""
    line = node.start_mark.line + 1
    if obj is None:
        return []
    if not isinstance(obj, Mapping):
        problems.append(
            InputError(
                f"a manifest must be a mapping (a Kubernetes object), not {describe_type(obj)}",
                file=file,
                line=line,
                document=index,
                field=render_field(prefix) or None,
            )
        )
        return []
    kind = obj.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and "items" in obj:
        items = obj.get("items")
        where = Where(file, index, line, prefix, lines)
        if items is not None and not isinstance(items, list):
            problems.append(where.error(("items",), f"must be a list, not {describe_type(items)}"))
            return []
        items_node = _child(node, "items")
        documents: list[Document] = []
        item_kind = kind[: -len("List")]
        for i, item in enumerate(items or ()):
            item_node: yaml.Node = (
                items_node.value[i] if isinstance(items_node, yaml.SequenceNode) else node
            )
            if isinstance(item, Mapping) and item_kind and "kind" not in item:
                # A typed list from the API (PodList) leaves kind and apiVersion out of its items.
                item = {"kind": item_kind, "apiVersion": obj.get("apiVersion"), **item}
            documents += _expand(
                item, item_node, file, index, (*prefix, "items", i), lines, problems
            )
        return documents
    return [Document(obj, file, index, line, prefix, lines)]


def _child(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in reversed(node.value):
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return None


def read_documents(data: bytes, file: str, problems: list[InputError]) -> list[Document]:
    """The objects of one input (a file's bytes, a ConfigMap value), its problems appended.

    An input past a bound (size, documents, nesting, alias expansion) is refused from that point
    with one problem; the documents before it are kept (the caller rejects the input anyway).
    """
    too_big = check_size(data, file)
    if too_big is not None:
        problems.append(too_big)
        return []
    loader = _Loader(data)
    lines = LineFinder(data)
    documents: list[Document] = []
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            index += 1
            bound = check_document_count(index, node, file) or check_node(node, file, index)
            if bound is not None:
                problems.append(bound)
                break
            try:
                obj = loader.construct_fast(node)
            except (ValueError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
                problems.append(
                    InputError(
                        f"a value cannot be read: {exc}",
                        file=file,
                        line=node.start_mark.line + 1,
                        document=index,
                    )
                )
                break
            for key, line, first in loader.duplicates:
                problems.append(
                    InputError(
                        f"duplicate key {key!r} (first at line {first}); the later value would "
                        "silently win",
                        file=file,
                        line=line,
                        document=index,
                    )
                )
            loader.duplicates.clear()
            documents += _expand(obj, node, file, index, (), lines, problems)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        context = exc.context or ""
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            context += f" (line {exc.context_mark.line + 1})"
        reason = " ".join(p for p in (context, exc.problem) if p) or "broken YAML"
        problems.append(
            InputError(
                f"invalid YAML: {reason}",
                file=file,
                line=None if mark is None else mark.line + 1,
                document=index + 1,
            )
        )
    except yaml.YAMLError as exc:
        problems.append(InputError(f"invalid YAML: {exc}", file=file, document=index + 1))
    finally:
        loader.dispose()
    return documents
