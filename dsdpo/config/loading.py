"""Reading a config: a YAML/JSON file, dotted overrides and `--set` pairs into a checked Config,
converting each value to its field's type and naming the field (or the unknown one) when it cannot."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dsdpo.config.run import SECTIONS, Config
from dsdpo.errors import DsdpoError


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and, for strings from the command line, convert) one field's value."""
    hint = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in hint:
            return None
        raise DsdpoError(f"{name} may not be empty")
    for kind in (k for k in hint if k is not type(None)):
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif kind is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float and not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        elif kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in hint)
    raise DsdpoError(f"{name}: expected {expected}, got {value!r}")


def _section_from_dict(cls: type, values: dict[str, Any], section: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f"; known: {', '.join(names)}"
            raise DsdpoError(f"{source}: unknown field {section}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: {section}.{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested sections; unknown sections or fields are errors naming them."""
    if not isinstance(data, dict):
        raise DsdpoError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise DsdpoError(f"{source}: unknown section {name!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise DsdpoError(f"{source}: section {name!r} must be a mapping of fields")
        sections[name] = _section_from_dict(hints[name], values, name, source)
    return Config(**sections)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON training config into nested dicts (not yet validated)."""
    file = Path(path)
    if not file.is_file():
        raise DsdpoError(f"{file}: no such training config file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise DsdpoError(f"{file}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DsdpoError(
            f"{file}: expected a mapping of sections ({', '.join(SECTIONS)}), found a {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys ("score.budget": 4) on nested dicts; None values are left alone."""
    merged = {section: dict(values) for section, values in data.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:
            raise DsdpoError(f"override {dotted!r}: use section.field=value, e.g. score.budget=4")
        merged.setdefault(section, {})[key] = value
    return merged


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """`--set score.budget=4` pairs into a dict; values stay strings and are converted per field."""
    parsed = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise DsdpoError(f"--set {item!r}: expected section.field=value")
        parsed[key.strip()] = value.strip()
    return parsed
