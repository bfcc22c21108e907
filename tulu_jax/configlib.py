"""Typed configs: frozen, keyword-only dataclasses filled from YAML plus dotted CLI overrides.

A config is a tree of `@dataclass(frozen=True, kw_only=True)` classes, one per concern, every field written
`field(default=..., metadata={"help": "..."})`. `load_config` reads a YAML file, applies `a.b.c=value`
overrides and checks every value against its annotation, so a typo or a wrong type fails at start-up with
the full dotted key instead of deep inside a run.

Supported annotations: int, float (ints accepted), str, bool, `X | None`, `Literal[...]`, `tuple[X, ...]`
(a list, or a comma-separated string from the CLI), `dict[K, V]`, `Any`, and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

import yaml

__all__ = ["ConfigError", "config_help", "from_dict", "load_config", "to_dict"]

# YAML 1.1 (PyYAML) needs a dot and a signed exponent to see a float, so `5e-6` or `1e5` arrive as strings.
_EXP_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or fails its section's validation."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path or '<root>'}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # bool is an int subclass


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks `value` against annotation `tp` and returns it in canonical form (tuples, floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty YAML section (`optim:`) means "all defaults"
            value = {}
        if not isinstance(value, dict):
            _fail(path, tp, value)
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):  # keep a nested section's precise error
            return _convert(options[0], value, path)
        for arg in options:
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        _fail(path, tp, value)
    if origin is Literal:
        # Compare types too, so that True does not match a Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        _fail(path, tp, value)
    if origin is tuple:
        if isinstance(value, str):  # CLI form `a,b,c`; each non-str piece is parsed as YAML
            pieces = [p.strip() for p in value.split(",") if p.strip()]
            value = [p if (args[:1] == (str,)) else _safe_load(p, path) for p in pieces]
        if not isinstance(value, list | tuple):
            _fail(path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(path, tp, value)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, tp, value)
        key_tp, val_tp = args or (Any, Any)
        return {_convert(key_tp, k, path): _convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return float(value)
        if _is_number(value):
            return float(value)
        _fail(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(path, tp, value)
    if isinstance(tp, type):  # str, bool, NoneType and any other plain class
        if isinstance(value, tp):
            return value
        _fail(path, tp, value)
    raise TypeError(f"{path}: unsupported annotation {tp!r}")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, checking keys and types; missing keys take defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, dict):
        _fail(path, cls, data)
    hints = typing.get_type_hints(cls)  # resolves string annotations
    fields = {f.name: f for f in _init_fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = f" under '{path}'" if path else ""
        raise ConfigError(
            f"unknown key '{_join(path, str(unknown[0]))}'; valid keys{where}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section's __post_init__ validation
        key = _named_field(str(e), fields)
        if key is not None:
            raise ConfigError(f"{_join(path, key)}: {e}") from e
        raise ConfigError(f"{path or '<root>'} ({cls.__name__}): {e}") from e


def _named_field(message: str, fields) -> str | None:
    """The field a validation message is about: the one whose name occurs first in it as a whole word
    (`unknown chat_template 'x'` -> chat_template), None when it names none."""
    found = [(m.start(), name) for name in fields for m in [re.search(rf"\b{re.escape(name)}\b", message)] if m]
    return min(found)[1] if found else None


def _safe_load(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        what = f"cannot parse {text!r} as YAML" if "\n" not in text and len(text) <= 80 else "not valid YAML"
        raise ConfigError(f"{where}: {what}{at}: {problem}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:  # absent, or an empty YAML section
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value


def load_config(cls: type, yaml_path: str | None, overrides: typing.Sequence[str] = ()) -> Any:
    """Reads YAML (optional), applies `dotted.key=value` overrides (values parsed as YAML), then type-checks."""
    data: Any = {}
    if yaml_path:
        try:
            with open(yaml_path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{yaml_path}: cannot read it as a YAML text file ({e})") from None
        data = _safe_load(text, yaml_path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{yaml_path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed override {item!r}; expected dotted.key=value")
        _set_dotted(data, key, _safe_load(raw, key))
    return from_dict(cls, data)


def to_dict(cfg: Any) -> Any:
    """Plain dicts/lists/scalars (tuples become lists) so `yaml.safe_dump` can write the run's config.yaml."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _init_fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside `tp` (`Foo` or `Foo | None`), if any: its fields are keys one can set."""
    candidates = [tp, *typing.get_args(tp)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def config_help(cls: type, path: str = "") -> str:
    """One line per settable dotted key: `key (type, default ...): help`."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in _init_fields(cls):
        key, tp = _join(path, f.name), hints[f.name]
        help_text = f.metadata.get("help", "")
        sub = _nested_dataclass(tp)
        if sub is not None:
            lines.append(f"{key}: [section] {help_text}".rstrip())
            lines.append(config_help(sub, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        lines.append(f"{key} ({_type_name(tp)}, default {default}): {help_text}".rstrip())
    return "\n".join(line for line in lines if line)
