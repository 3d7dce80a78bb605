"""`params.yaml` mappings <-> dataclasses: typed construction that refuses unknown keys.

Used by the stage configurations (`vidistill.config`) and by every method's hyperparameter
dataclass (`vidistill.distill`); it depends on nothing else of vidistill but `vidistill.errors`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vidistill.errors import ConfigError


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict, refusing unknown keys.

    Args:
        cls: a dataclass type; nested dataclass fields are built recursively.
        data: the mapping (missing keys keep their defaults).
        where: prefix of the key names in error messages (e.g. `"distill.methods.kd."`).

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or a value that does not fit
            the type of the field's default.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = data[name]
        default = field_default(f)
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, default, f"{where}{name}")
    return cls(**kwargs)


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its default factory)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def coerce(value: Any, default: Any, name: str) -> Any:
    """`value` converted to the type of `default` (strings from the command line included).

    Raises:
        ConfigError: the value does not fit (the message names `name`).
    """
    if default is None or value is None:
        return value
    target = type(default)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if target in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if target is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    try:
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {target.__name__}, got {value!r}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `d["a"]["b"] = value` for `dotted == "a.b"`."""
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section")
    cur[keys[-1]] = value
