"""Loading recipes: TOML, ``--set`` overrides, the typed build of kit.config's dataclasses with errors
that name the dotted key, and the frozen run.toml written back.

Why apart from kit.config: the sections say what a run is; this module says how text becomes one
(and back), with the checks every value passes on the way: its type, finite and 64-bit numbers,
plain values in raw tables, and dates or times on the command line taken as text.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit import validation as rules
from kit.errors import ConfigError
from kit.validation import show as _show

if TYPE_CHECKING:
    from kit.config import RunConfig


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a TOML recipe, apply ``dotted.key=value`` overrides, build and validate the config.

    Relative ``runs_dir`` and source paths are resolved against the current directory, except source
    paths that exist relative to the recipe file (recipes that ship their own data).
    """
    path = Path(path)
    if not path.exists():
        builtin = builtin_recipe(path.name) if path.parent == Path(".") else None
        if builtin is None:
            raise ConfigError(f"recipe {path} does not exist: give a path to a .toml file, or the name of a "
                              f"shipped one ({', '.join(builtin_recipes())})")
        path = builtin
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give a .toml recipe") from None
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    cfg.run.runs_dir = str(Path(cfg.run.runs_dir).expanduser().absolute())
    for src in cfg.data.sources:
        p = Path(src.path).expanduser()
        if not p.is_absolute() and (path.parent / p).exists() and not p.exists():
            p = path.parent / p
        src.path = str(p.absolute()) if not any(c in src.path for c in "*?[") else str(p)
    cfg.check()
    return cfg


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with kit (package data of kit.jobs, wherever kit is installed)."""
    from importlib.resources import files

    return sorted(p.name for p in files("kit.jobs").iterdir() if p.name.endswith(".toml"))


def builtin_recipe(name: str) -> Path | None:
    """A shipped recipe by file name, found with importlib.resources: in an editable checkout it is
    jobs/NAME, in an installed wheel (the container images) site-packages/kit/jobs/NAME."""
    from importlib.resources import files

    p = files("kit.jobs").joinpath(name)
    return Path(str(p)) if p.is_file() else None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as a TOML literal, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set trainer.max_steps=100")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        item.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"--set {key}: the value is not valid UTF-8 text") from None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(value, (datetime.date, datetime.time)):
        value = text.strip()  # 20:00:00 or 2026-12-01T06:00:00: no recipe key is date-typed, these are text
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any]) -> RunConfig:
    from kit.config import RunConfig

    return _build(RunConfig, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, found {type(raw).__name__} {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, names, n=1, cutoff=0.5)
        hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown key {prefix}{k}{hint}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{f.name} is required")
            continue
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")  # type: ignore[arg-type]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, found {type(value).__name__} {_show(value)}")
        if dataclasses.is_dataclass(item_tp):
            out = []
            for i, v in enumerate(value):
                label = v.get("name", i) if isinstance(v, dict) else i
                out.append(_build(item_tp, v, f"{key}[{label}]."))  # type: ignore[arg-type]
            return out
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, found {type(value).__name__} {_show(value)}")
        rules.check_plain(key, value)
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    rules.check_number(key, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key} must be {_TYPE_NAMES[tp]}, found {type(value).__name__} {_show(value)}")
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def dumps_toml(d: dict[str, Any]) -> str:
    """Write the resolved config as TOML (scalars, lists, tables, arrays of tables: all we use)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return _toml_str(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{_toml_str(k)} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(name: str, t: dict[str, Any]) -> None:
        plain = {k: v for k, v in t.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        arrays = {k: v for k, v in t.items() if k not in plain}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in plain.items())
        lines.append("")
        for k, items in arrays.items():
            for item in items:
                lines.append(f"[[{name}.{k}]]")
                lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())
                lines.append("")

    for name, t in d.items():
        table(name, t)
    return "\n".join(lines)


def _toml_str(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped (JSON's escapes would
    write non-BMP characters as surrogate pairs, which TOML refuses, and leave DEL bare)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def describe_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """All dotted keys of the recipe (of kit.config.RunConfig by default), for error messages and docs."""
    if cls is None:
        from kit.config import RunConfig

        cls = RunConfig
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe_keys(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            out.append(prefix + f.name)
    return out
