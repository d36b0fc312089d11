"""Generic machinery behind `fusedrl.config`: typed TOML/CLI values into dataclasses and back.

Works on any tree of dataclasses (the root's fields are the TOML tables); the
run's dataclasses, their allowed values and `load_config` live in config.py.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# ----------------------------------------------------------------------------- typing

class ConfigError(ValueError):
    """A bad configuration value, found when the config is loaded.

    Attributes: field ("section.field"), value (what was given), allowed (what is accepted).
    The CLI prints it as one line (exit 2); a ValueError is still caught by callers that expect one.
    """

    def __init__(self, field: str, value: Any, allowed: Any, message: Optional[str] = None):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(message or f"{field}: expected {allowed}, got {value!r}")

    @classmethod
    def message(cls, field: str, text: str) -> "ConfigError":
        """A ConfigError about `field` explained in words (a missing setting, a value that cannot work)."""
        return cls(field, None, None, text)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str, *, from_cli: bool = False) -> Any:
    """Check (and for CLI strings, parse) `value` against annotation `tp`.

    Args:
        value: a TOML value, or the raw string of a `--key=value` override when from_cli.
        tp: the field's annotation (int, float, bool, str, List[X], Optional[X], Dict[str, Any]).
        key: "section.field" for error messages.
    Returns:
        The value converted to the field's type (ints widen to float; lists are copied).
    Raises:
        ValueError naming `key`, the value given and the type expected.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner[0], key, from_cli=from_cli)
    if from_cli and isinstance(value, str) and tp is not str:
        value = _parse_cli_literal(value, tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a field type this parser does not know is a programming error
        raise TypeError(f"{key}: unsupported field type {tp}")
    raise ConfigError(key, value, _type_name(tp),
                      f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _parse_cli_literal(text: str, tp: Any) -> Any:
    """Parse the text of a CLI override as a TOML literal; lists may also be "a,b,c"."""
    lowered = text.strip().lower()
    if tp is bool and lowered in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return lowered in ("true", "1", "yes", "on")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
        is_list = typing.get_origin(tp) in (list, List)
        return [value] if is_list and not isinstance(value, list) else value
    except tomllib.TOMLDecodeError:
        pass
    if typing.get_origin(tp) in (list, List):
        item_tp = (typing.get_args(tp) or (str,))[0]
        if "," not in text:
            return [_parse_cli_literal(text, (typing.get_args(tp) or (Any,))[0])]
        return [p.strip() if item_tp is str else _parse_cli_literal(p, item_tp) for p in text.split(",") if p.strip()]
    return text  # left as a string: coerce() reports the type mismatch with the key


# ----------------------------------------------------------------------------- building

def apply_table(obj: Any, table: Dict[str, Any], prefix: str) -> None:
    """Set the fields of dataclass `obj` from a TOML table, recursing into nested dataclasses."""
    if not isinstance(table, dict):
        raise ConfigError(prefix, table, "a table")
    types = _field_types(type(obj))
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in types:
            known = ", ".join(types)
            raise ConfigError(key, value, list(types), f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            apply_table(current, value, key)
        else:
            setattr(obj, name, coerce(value, types[name], key))


def apply_override(cfg: Any, dotted: str, value: Any, *, from_cli: bool = True) -> None:
    """Set the field at `dotted` ("section.field", or "model.arch.key" inside a table field) in place.

    Args:
        value: the text of a `--a.b=c` override when from_cli, else an already typed (TOML) value.
    """
    parts = dotted.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        key = ".".join(parts[: i + 1])
        types = _field_types(type(obj))
        if name not in types:
            raise ConfigError(key, value, list(types), f"unknown config key {key!r}; known keys here: "
                              f"{', '.join(types)}")
        current = getattr(obj, name)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current):
                raise ConfigError(key, value, f"one of its fields ({key}.FIELD=VALUE)",
                                  f"{key}: is a section; override one of its fields ({key}.FIELD=VALUE)")
            setattr(obj, name, coerce(value, types[name], key, from_cli=from_cli))
            return
        if isinstance(current, dict):  # a table field (model.arch): the rest of the path is its key
            parsed = _parse_cli_literal(value, Any) if from_cli and isinstance(value, str) else value
            current[".".join(parts[i + 1:])] = parsed
            return
        if not dataclasses.is_dataclass(current):
            raise ConfigError(key, value, f"--{key}=VALUE",
                              f"{key}: is a {type(current).__name__} field, not a section; use --{key}=VALUE")
        obj = current


def parse_overrides(args: Sequence[str]) -> List[Tuple[str, str]]:
    """Split ["--a.b=c", "--x.y", "z"] into [("a.b", "c"), ("x.y", "z")]."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError("override", arg, "--section.field=value",
                              f"override {arg!r}: expected --section.field=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError("override", arg, f"--{body}=VALUE", f"override {arg!r}: missing a value (--{body}=VALUE)")
        pairs.append((key, value))
        i += 1
    return pairs


def read_toml(path: str | Path) -> Dict[str, Any]:
    """The table of a TOML file; ValueError naming the file when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file", str(path), "an existing TOML file",
                          f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config file", str(path), "valid TOML",
                          f"config file {str(path)!r}: invalid TOML: {err}") from None


# ----------------------------------------------------------------------------- writing

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # None entries are dropped: TOML has no null, and transformers configs default them to None.
        items = [(k, v) for k, v in value.items() if v is not None]
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Any) -> str:
    """Render a config as TOML that `load_config` reads back to an equal config.

    None values are written as comments (TOML has no null); every Optional
    field defaults to None (a test checks it), so reading the file back restores them.
    """
    lines: List[str] = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines.append(f"[{f.name}]")
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            lines.append(f"# {sf.name} = None" if value is None else f"{sf.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reference

def field_docs(cls: type) -> Dict[str, str]:
    """The string literal right under each field of dataclass `cls`, by field name."""
    source = inspect.getsource(cls)
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_tables(cfg: Any) -> str:
    """A markdown reference of every table of `cfg` and its fields: name, type, default, documentation."""
    out = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        docs, types = field_docs(type(section)), _field_types(type(section))
        out += [f"### [{f.name}]", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for sf in dataclasses.fields(section):
            default = getattr(section, sf.name)
            shown = "None" if default is None else _toml_value(default)
            out.append(f"| `{sf.name}` | {_type_name(types[sf.name])} | `{shown}` | {docs.get(sf.name, '')} |")
        out.append("")
    return "\n".join(out)
