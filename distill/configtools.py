"""Typed dataclasses from plain dicts (YAML), dotted overrides, errors that name the field.

`from_dict(cls, data, path)` builds a (frozen) dataclass from a dict, recursively, checking every
key against the fields (unknown keys get the closest known name suggested) and every value against
the field's type annotation. Errors are `ConfigError`s naming the dotted path, the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from distill.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans and floats: only true/false (any case) are booleans, so `on`,
    `off`, `yes` and `no` stay the strings the user typed (an enum field takes them; a bool field
    reads them), and `1e-3` is a number, as `1.0e-3` is."""


_REPLACED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_EXPONENT = r"(?:[eE][-+]?[0-9]+)"
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    rf"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*{_EXPONENT}?|\.[0-9][0-9_]*{_EXPONENT}?|[0-9][0-9_]*{_EXPONENT})"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
_WORD_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def load_yaml(text: str) -> Any:
    """`text` parsed as YAML with YAML 1.2's booleans (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_key_error(path: str, key: str, known) -> ConfigError:
    where = f"{path}.{key}" if path else key
    return ConfigError(f"{where}: unknown key.{_suggest(key, known)} Known keys: {', '.join(sorted(known))}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def convert(value: Any, tp, path: str) -> Any:
    """`value` checked against (and converted to) the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}=None: a value is required ({' or '.join(_type_name(o) for o in options)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: expected one of "
                          f"{', '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r}: allowed values are {', '.join(map(str, allowed))}."
                              f"{_suggest(str(value), map(str, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping with keys of {tp.__name__}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, str) and value.lower() in _WORD_BOOLEANS:
            return _WORD_BOOLEANS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{path}={shortened(repr(value))}: expected an integer")
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{path}={shortened(str(value))}: out of range (a 64-bit integer at most)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    return value


def from_dict(cls, data: dict, path: str = ""):
    """An instance of dataclass `cls` from `data`, validated; errors name `path.field`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(path, str(key), fields)
        kwargs[key] = convert(value, hints[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(f"{path}.{message}" if path and not message.startswith(path) else message) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or cls.__name__}: {error}") from None


def to_dict(obj) -> Any:
    """Plain Python (YAML-ready) form of a config dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def shortened(text: str, keep: int = 40) -> str:
    """`text`, or its start and its length when longer than `keep` characters (a message stays one line)."""
    text = str(text)
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML); a ConfigError (one line) when the value
    does not parse (bad YAML, an integer of more digits than Python converts)."""
    if "=" not in text:
        raise ConfigError(f"override {shortened(text)!r}: expected dotted.key=value, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as error:
        raise ConfigError(f"{key.strip()}={shortened(raw)}: not a value ({_one_line(error)}); give a number, a "
                          "string, or a YAML list or mapping in quotes, e.g. 'a.b=[1, 2]'") from None


def read_config_mapping(path: Path, where: str) -> dict:
    """A YAML file of config sections as a mapping; a ConfigError (one line) starting with `where`
    when it does not parse or is not a mapping."""
    try:
        raw = load_yaml(Path(path).read_text()) or {}
    except (yaml.YAMLError, ValueError) as error:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(error)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return raw


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list tree, creating mappings on the way."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: list index out of range (the list has {len(node)} items)")
            node = node[int(part)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: list index out of range (the list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


__all__ = ["ConfigError", "convert", "field_names", "from_dict", "parse_override", "read_config_mapping", "set_dotted",
           "to_dict", "unknown_key_error"]
