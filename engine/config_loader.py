"""Loading typed configuration trees: YAML, dotted overrides, type checks, saving.

``load_config(cls, path, overrides)`` reads the YAML, applies ``a.b=c`` overrides,
coerces and checks each value against the dataclass field's type and returns the
tree. Unknown keys are errors that name the closest valid key. ``save_config``
writes the resolved tree to ``<output_dir>/config.yaml``. The sections themselves
live in ``engine/config.py``, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


def check_choice(key: str, value: Any, choices: tuple, allow_path: bool = False) -> None:
    if value in choices:
        return
    if allow_path and isinstance(value, str) and value:
        if not Path(value).exists():
            raise ConfigError(f"{key}: checkpoint path does not exist: {value}")
        return
    raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


# --------------------------------------------------------------------------- loading
T = TypeVar("T")


def _key(name: str) -> str:
    """The config key of a field: a Python keyword is spelled with a trailing ``_`` (``async_``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _attr(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def _field_types(cls: type) -> dict[str, Any]:
    """Config key -> type for each field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {_key(f.name): hints[f.name] for f in dataclasses.fields(cls)}


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _coerce(path: str, tp: Any, value: Any, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, inner[0], value, base)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return _build(tp, value, path, base if dataclasses.is_dataclass(base) else None)
    if origin is list:
        item_name = {str: "strings", int: "integers", float: "numbers"}.get(
            args[0] if args else None, "values"
        )
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list of {item_name}, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path} must be a bool, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be {tp.__name__}, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{path} must be an int, got {value!r}")
        return out
    if _is_mapping_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(f"{path} key", key_tp, k): _coerce(f"{path}.{k}", val_tp, v) for k, v in value.items()
        }
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "", base: Any = None) -> T:
    """``cls`` from ``data``, starting from ``base`` (or the class defaults) for keys ``data`` lacks.

    Sections keep the defaults their parent gives them (``field(default_factory=...)``),
    so overriding one key of a section never resets its other keys.
    """
    types_ = _field_types(cls)
    if base is None:
        base = cls()
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            raise ConfigError(f"unknown config key {full!r}{_closest(key, list(types_))}")
        kwargs[_attr(key)] = _coerce(full, types_[key], value, getattr(base, _attr(key)))
    return dataclasses.replace(base, **kwargs)


def _is_mapping_type(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        if _is_mapping_type(node_cls):  # a mapping field: ``models.policies.ppo=path`` sets one entry
            where = ".".join(parts[:i])
            if i != len(parts) - 1:
                raise ConfigError(
                    f"override {dotted!r}: {where} is a mapping of plain values; "
                    f"set {where}.{part}=value or {where}={{...}}"
                )
            node[part] = value
            return
        if not dataclasses.is_dataclass(node_cls):
            where = ".".join(parts[:i])
            raise ConfigError(
                f"override {dotted!r}: {where} is a single value, not a section; set {where}=value"
            )
        types_ = _field_types(node_cls)
        if part not in types_:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(
                f"unknown config key {dotted!r} (no {part!r} under {where}){_closest(part, list(types_))}"
            )
        if i == len(parts) - 1:
            node[part] = value
        else:
            node_cls = types_[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """``"actor.lr=1e-6"`` -> ``("actor.lr", 1e-6)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file plus dotted overrides; errors name the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file does not exist: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, cls, key, value)
    return _build(cls, tree)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-serialisable data."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {_key(f.name): conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``<output_dir>/config.yaml``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
