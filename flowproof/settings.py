"""Loading a service's settings dataclass from flags and environment, in one place.

Each field `foo_bar` of the dataclass becomes `--foo-bar` and `<PREFIX>FOO_BAR` (the flag wins),
with the field's attribute docstring as its help text. Secrets are read only from the environment
or a file, never from a flag, so they do not show in process listings. This module never starts
anything and knows no particular service.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting that cannot work: names the setting, the flag or variable, and why."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a number ({kind})") from None
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: {raw!r} is not true or false")
    if kind.startswith("tuple"):
        return tuple(part for part in (p.strip() for p in raw.split(",")) if part)
    return raw


def _nested(f: dataclasses.Field[Any]) -> type | None:
    """The settings class a field composes (a dataclass default), or None for a plain value."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return type(value)
    return None


def flat_fields(cls: type) -> list[tuple[type, dataclasses.Field[Any]]]:
    """Every plain field of `cls` with the class declaring it; composed settings (a field whose
    default is another settings dataclass) contribute their own fields, under their own names."""
    out: list[tuple[type, dataclasses.Field[Any]]] = []
    for f in dataclasses.fields(cls):
        inner = _nested(f)
        if inner is None:
            out.append((cls, f))
        else:
            out += flat_fields(inner)
    names = [f.name for _, f in out]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: settings named twice: {', '.join(clashes)}")
    return out


def build_parser(
    cls: type,
    *,
    prog: str,
    description: str,
    secrets: Sequence[str] = (),
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A flag per setting of `cls`, its docstring and default as help; `epilog` (an Examples
    section) is printed as written."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter,
    )
    docs: dict[type, dict[str, str]] = {}
    for owner, f in flat_fields(cls):
        if f.name in secrets:
            continue
        text = docs.setdefault(owner, field_docs(owner)).get(f.name, "")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{text} (default: {_default_text(f)})",
        )
    for name in secrets:
        parser.add_argument(
            f"--{name.replace('_', '-')}-file",
            dest=f"{name}_file",
            default=None,
            help=f"file holding the {name} (or the environment)",
        )
    return parser


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value).replace("%", "%%")


def load(
    cls: type[T],
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    env_prefix: str,
    prog: str = "",
    description: str = "",
    parser: argparse.ArgumentParser | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from flags, then environment (`env_prefix` + NAME, then aliases), then defaults.

    The flags are `parser`'s (build_parser's for `cls`), else a parser made with `prog` and
    `description`. `secrets` maps a field to its environment variable; `--<field>-file` or
    `<VAR>_FILE` name a file to read it from instead.
    """
    secrets = secrets or {}
    if parser is None:
        parser = build_parser(cls, prog=prog, description=description, secrets=list(secrets))
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for _, f in flat_fields(cls):
        if f.name in secrets:
            continue
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(env_prefix + f.name.upper())
        for alias in (aliases or {}).get(f.name, ()):
            if raw is None:
                raw = environ.get(alias)
        if raw is not None:
            values[f.name] = _convert(f.name, raw, f.type)
    for name, variable in secrets.items():
        path = getattr(args, f"{name}_file") or environ.get(f"{variable}_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    values[name] = fh.read().strip()
            except OSError as exc:
                raise SettingsError(f"{name} file {path!r}: {exc.strerror}") from exc
        else:
            values[name] = environ.get(variable, "").strip()
    try:
        return _build(cls, values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from exc


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    """`cls` from flat values: each composed settings class built from its own fields."""
    own: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        inner = _nested(f)
        if inner is not None:
            own[f.name] = _build(inner, values)
        elif f.name in values:
            own[f.name] = values[f.name]
    return cls(**own)


def describe(settings: object, *, secrets: Sequence[str] = ()) -> str:
    """One line for the start-up log: every setting but the secrets."""
    parts = []
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            parts.append(describe(value, secrets=secrets))
        elif f.name not in secrets:
            parts.append(f"{f.name}={value}")
    return " ".join(parts)
