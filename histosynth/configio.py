"""Typed configs: YAML or dicts loaded into dataclasses, with errors that name the key path.

Every config in histosynth (recipes, training stages, the pipeline) is a dataclass loaded through
`from_dict`, never instantiated from `target:` strings. Errors read like
``recipe.sampler.name: unknown value 'euler'; allowed: ddpm, ddim, dpmpp2m``.

A dataclass may define ``validate(self, path: str) -> None`` for checks across fields; it is called
after the fields are filled, with the key path of the object. A string field whose values come from a
registry is typed ``Annotated[str, OneOf(REGISTRY)]``. `describe_keys` lists every key of a config with its
type, default and meaning (the field's trailing comment), for `--explain` and documentation tests.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from histosynth.errors import InputError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: typing hashes Annotated's metadata
class OneOf:
    """Marks `Annotated[str, OneOf(registry)]`: the value must be one of `registry`'s keys, read when a config is
    loaded (so entries registered later count)."""

    registry: Collection[str]


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning I/O and syntax problems into `InputError`s that name the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a UTF-8 text file") from None


def load(cls: type[T], path: str | Path, root: str | None = None) -> T:
    """Load a YAML file into dataclass `cls`; `root` names the top of key paths (default: file stem)."""
    data = load_yaml(path)
    return from_dict(cls, data if data is not None else {}, root or Path(path).stem)


def from_dict(cls: type[T], data: Any, path: str = "config") -> T:
    """Build dataclass `cls` from plain data, checking keys, types and allowed values recursively."""
    return _convert(cls, data, path)


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain YAML/JSON-able data (tuples become lists, Paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = get_args(tp)
        value = _convert(base, value, path)
        for extra in extras:
            if isinstance(extra, OneOf) and value not in extra.registry:
                raise InputError(f"{path}: unknown value {value!r}; allowed: {', '.join(map(str, extra.registry))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise InputError(
                f"{path}: unknown value {value!r}; allowed: {', '.join(str(a) for a in allowed)}"
            )
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except InputError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise InputError(errors[0])
        raise InputError(f"{path}: {value!r} matches none of: " + "; ".join(errors))
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise InputError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _convert(key_tp, k, f"{path}"): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise InputError(f"{path}: expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"configio cannot convert to {tp!r} (at {path})")


def _convert_dataclass(cls: Any, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a mapping of {cls.__name__} keys, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise InputError(
            f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(fields)}"
        )
    hints = get_type_hints(cls, include_extras=True)
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}"
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{sub}: required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One key of a config, for `--explain` and docs checks."""

    path: str  # dotted key path; mapping keys chosen by the user read `<name>`
    type: str  # e.g. "integer", "png|jpeg|tiff", "mapping", "{name: integer}"
    default: str  # "required", "null" (not set) or the default in YAML spelling
    meaning: str  # the field's trailing comment in the dataclass source


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of dataclass `cls`, nested dataclasses (also inside Optional and dict values) expanded."""
    hints = get_type_hints(cls, include_extras=True)
    comments = field_comments(cls)
    docs: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        docs.append(KeyDoc(path, type_text(tp), _default_text(f), comments.get(f.name, "")))
        inner, under = _nested_dataclass(tp)
        if inner is not None:
            docs.extend(describe_keys(inner, f"{path}.{under}"))
    return docs


def _nested_dataclass(tp: Any) -> tuple[Any, str]:
    """The dataclass a field holds directly, in an Optional, or as dict values (then under `<name>.`)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            found = _nested_dataclass(option)
            if found[0] is not None:
                return found
    if origin is dict:
        inner, under = _nested_dataclass(get_args(tp)[1])
        if inner is not None:
            return inner, f"<name>.{under}"
    return None, ""


def type_text(tp: Any) -> str:
    """A short readable name of a config type: `integer`, `png|jpeg`, `{name: number}`, `[string]`."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        for extra in extras:
            if isinstance(extra, OneOf):
                return "|".join(map(str, extra.registry))
        return type_text(base)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        options = [type_text(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in get_args(tp) else "")
    if origin in (list, tuple, typing.Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"[{type_text(args[0]) if args else 'any'}]"
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return f"{{name: {type_text(val_tp)}}}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    names = {str: "string", int: "integer", float: "number", bool: "true|false", Path: "path", Any: "any"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(see below)"
    return yaml.safe_dump(to_dict(value), default_flow_style=True).strip().removesuffix("...").strip()


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Each field's documentation in `cls`'s source (nanoGPT-style): the trailing `# comment` of its line, or,
    for a field line without one, the block of `# comment` lines directly above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    line_tokens: list[tokenize.TokenInfo] = []
    above: list[str] = []  # the comment-only lines since the last other line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.NEWLINE, tokenize.NL):
            line_tokens.append(token)
            continue
        names = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        line_tokens = []
        if len(names) == 1 and names[0].type == tokenize.COMMENT:
            above.append(names[0].string.lstrip("#").strip())
            continue
        # A field line reads `name: type ...`, a name then `:`, optionally ending in a comment.
        if len(names) >= 3 and names[0].type == tokenize.NAME and names[1].string == ":":
            if names[-1].type == tokenize.COMMENT:
                comments.setdefault(names[0].string, names[-1].string.lstrip("#").strip())
            elif above:
                comments.setdefault(names[0].string, " ".join(above))
        above = []  # any other line, a blank one too, ends the block
    return comments


def require(condition: bool, path: str, message: str) -> None:
    """Raise an `InputError` at `path` unless `condition`; for use in `validate` methods."""
    if not condition:
        raise InputError(f"{path}: {message}")
