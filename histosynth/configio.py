"""Typed configs: YAML or dicts loaded into dataclasses, with errors that name the key path.

Every config in histosynth (recipes, training stages, the pipeline) is a dataclass loaded through
`from_dict`, never instantiated from `target:` strings. Errors read like
``recipe.sampler.name: unknown value 'euler'; allowed: ddpm, ddim, dpmpp2m``.

A dataclass may define ``validate(self, path: str) -> None`` for checks across fields; it is called
after the fields are filled, with the key path of the object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from histosynth.errors import InputError

T = TypeVar("T")


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
    hints = get_type_hints(cls)
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


def require(condition: bool, path: str, message: str) -> None:
    """Raise an `InputError` at `path` unless `condition`; for use in `validate` methods."""
    if not condition:
        raise InputError(f"{path}: {message}")
