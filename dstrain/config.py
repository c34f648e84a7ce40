"""Typed configuration and the command line made from it.

Every flag is a field of a frozen dataclass: its default lives there and nowhere else, its help text is the
docstring written under the field (as torchtitan's ``config/configs.py`` does). :func:`add_arguments` turns a
config class into argparse arguments and :func:`from_args` turns the parsed namespace back into the config, so the
CLI cannot drift from the dataclasses. Nested config fields (``TrainConfig.model: ModelConfig``) are flattened:
their flags keep DeepSpeech's flat names (``--n_hidden``, not ``--model.n_hidden``) and appear as a help group.

Conventions, DeepSpeech's (absl) where it had them:

- ``bool`` fields: ``--name``, ``--noname``, ``--name=false``;
- ``tuple[str, ...]`` fields: one comma-separated value (``--train_files a,b``);
- ``X | None`` fields: default None, given as X;
- :func:`option` adds what a field cannot say by its type: other flag names, choices, positional arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Callable

_META = "dstrain.cli"


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    names: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    positional: bool = False,
    nargs: str | int | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    append: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with command-line details. ``names`` replaces ``--FIELD`` (the first is shown first);
    ``parse`` converts the flag's string; ``append`` makes a repeatable flag (a tuple of its values);
    ``cli=False`` keeps the field off the command line."""
    meta = {
        "names": names,
        "choices": choices,
        "positional": positional,
        "nargs": nargs,
        "parse": parse,
        "metavar": metavar,
        "append": append,
        "cli": cli,
    }
    kwargs: dict[str, Any] = {"metadata": {_META: meta}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_list(value: str) -> tuple[str, ...]:
    """DeepSpeech's comma-separated file lists."""
    return tuple(v for v in value.split(",") if v)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of ``cls`` (and its dataclass bases), joined into one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every field on the command line, nested configs flattened."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META, {})
        if not meta.get("cli", True) or not f.init:
            continue
        tp = hints[f.name]
        if _is_config(tp):
            out.extend(cli_fields(tp))
        else:
            out.append((f, tp))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _help(doc: str, default: Any, tp: Any) -> str:
    if default is dataclasses.MISSING or default in ("", (), None):
        return doc
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    if isinstance(default, bool):
        shown = str(default).lower()
    return f"{doc} (default {shown})" if doc else f"(default {shown})"


def _add_field(parser: argparse._ActionsContainer, cls: type, f: dataclasses.Field, tp: Any) -> None:
    meta = f.metadata.get(_META, {})
    doc = field_docs(cls).get(f.name, "")
    default = _default(f)
    required = default is dataclasses.MISSING
    base, optional = _unwrap_optional(tp)
    names = meta.get("names") or (f"--{f.name}",)
    kwargs: dict[str, Any] = {"help": _help(doc, default, tp).replace("%", "%%")}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    origin = typing.get_origin(base)
    elem = typing.get_args(base)[0] if origin is tuple and typing.get_args(base) else str

    if meta.get("positional"):
        if meta.get("nargs") is not None:
            kwargs["nargs"] = meta["nargs"]
        if meta.get("parse"):
            kwargs["type"] = meta["parse"]
        elif origin is tuple:
            kwargs["type"] = elem
        elif base in (int, float):
            kwargs["type"] = base
        if not required:
            kwargs.setdefault("nargs", "?")
            kwargs["default"] = default
        parser.add_argument(f.name, **kwargs)
        return

    kwargs["dest"] = f.name
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if base is bool:
        parser.add_argument(*names, type=parse_bool, nargs="?", const=True, **kwargs)
        for n in names:
            parser.add_argument(f"--no{n[2:]}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        return
    if meta.get("append"):
        # argparse appends to a copy of the default list; from_args turns it back into a tuple.
        kwargs.update(action="append", type=elem, default=None)
        parser.add_argument(*names, **kwargs)
        return
    if meta.get("parse"):
        kwargs["type"] = meta["parse"]
    elif origin is tuple:
        if meta.get("nargs") is not None:
            kwargs["nargs"] = meta["nargs"]
            kwargs["type"] = elem
        else:
            kwargs["type"] = parse_list if elem is str else (lambda v, e=elem: tuple(e(x) for x in v.split(",") if x))
    elif base in (int, float, str):
        kwargs["type"] = base
    elif meta.get("choices"):
        kwargs["type"] = type(meta["choices"][0])
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp!r}")
    parser.add_argument(*names, **kwargs)


def add_arguments(parser: argparse._ActionsContainer, cls: type, top: bool = True) -> None:
    """Arguments for every field of ``cls``; nested configs become argument groups titled by their docstring
    (argparse does not nest groups, so deeper configs join their parent's group)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get(_META, {}).get("cli", True) or not f.init:
            continue
        tp = hints[f.name]
        if not _is_config(tp):
            _add_field(parser, cls, f, tp)
        elif top:
            title = (inspect.getdoc(tp) or tp.__name__).splitlines()[0]
            add_arguments(parser.add_argument_group(title), tp, top=False)  # type: ignore[union-attr]
        else:
            add_arguments(parser, tp, top=False)


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    """The config ``cls`` from parsed arguments (fields kept off the command line take their defaults)."""
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata.get(_META, {})
        tp = hints[f.name]
        if _is_config(tp) and meta.get("cli", True):
            values[f.name] = from_args(tp, ns)
        elif meta.get("cli", True) and hasattr(ns, f.name):
            value = getattr(ns, f.name)
            if value is None and meta.get("append"):
                continue  # not given: the dataclass default
            if isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    """JSON-safe dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_file_argv(path: str, cls: type, given: list[str]) -> list[str]:
    """Command-line words for the flags a YAML (or JSON) file sets: ``{n_hidden: 2048, train_files: [a, b],
    augment: [...], shuffle: false}``. Keys are flag names without ``--``; a flag also given in ``given`` (the real
    command line) is left out, so the command line wins."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ValueError(f"--config {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    flags = {}
    for f, tp in cli_fields(cls):
        meta = f.metadata.get(_META, {})
        if meta.get("positional"):
            continue
        for name in meta.get("names") or (f"--{f.name}",):
            flags[name[2:]] = (name, f, tp, meta)
    on_command_line = {w.split("=", 1)[0][2:].removeprefix("no") for w in given if w.startswith("--")} | {
        w.split("=", 1)[0][2:] for w in given if w.startswith("--")
    }
    words: list[str] = []
    for key, value in data.items():
        if key not in flags:
            raise ValueError(f"--config {path}: unknown flag {key!r} for this command (see --help)")
        name, f, tp, meta = flags[key]
        if f.name in on_command_line or key in on_command_line:
            continue
        base, _ = _unwrap_optional(tp)
        # Typed as on the command line: YAML's own types, never coerced (bool("false") is True, str(None) "None").
        if value is None:
            raise ValueError(f"--config {path}: {key} has no value (null): give one, or leave the key out")
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false (a YAML bool), not {value!r}")
            words.append(f"{name}={'true' if value else 'false'}")
        elif meta.get("append"):
            for v in value if isinstance(value, list) else [value]:
                words += [name, str(v)]
        elif meta.get("nargs") is not None:
            words += [name, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        elif isinstance(value, list):
            words += [name, ",".join(str(v) for v in value)]
        else:
            words += [name, str(value)]
    return words
