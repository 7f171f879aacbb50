"""YAML files with `include:`, dotted `key=value` overrides, and conversion to `Config`.

Order of precedence, lowest first: dataclass defaults, included files (in order), the file's
own keys, command-line overrides. Everything funnels through one plain dict, which
`schema.coerce` turns into the typed tree; `validate` runs last.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_uni.config.schema import (
    Config,
    ConfigError,
    coerce,
    describe,
    field_types,
    unknown_key_error,
)
from megatron_uni.config.validate import validate

INCLUDE_KEY = "include"


# --------------------------------------------------------------------------- YAML files
def _read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file into a mapping, with file/line in every error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {path}", fix="check the path (includes are relative to "
            "the including file)"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"YAML syntax error in {where}: {problem}", fix="correct the YAML at that line"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections at the top level, "
            f"got {type(data).__name__}",
            fix="write it as `section:` blocks (model:, parallel:, ...)",
        )
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load `path` with its `include:` files merged underneath it (recursively).

    `_chain` holds the files being included right now, so a file may be included twice
    through different branches (a diamond) but never by itself (a cycle).
    """
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(
            f"include cycle: {cycle}", fix=f"remove the include of {path.name} that closes it"
        )
    data = _read_yaml(path)
    includes = data.pop(INCLUDE_KEY, None)
    if includes is None:
        includes = []
    elif isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            f"`include:` in {path} must be a path or a list of paths",
            field=INCLUDE_KEY,
            value=includes,
            fix="write include: base.yaml or include: [a.yaml, b.yaml]",
        )
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_tree(path.parent / inc, (*_chain, path)))
    return deep_merge(merged, data)


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and its YAML-parsed value."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ConfigError(
            f"malformed override '{text}': expected key=value",
            fix="write overrides as section.key=value, e.g. parallel.tp=2 or moe.layers=[0,2]",
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"cannot parse the value of override '{text}' as YAML: {err}",
            field=key,
            fix="quote strings that contain YAML syntax, e.g. key='\"a: b\"'",
        ) from None
    return [k.strip() for k in keys], value


def _check_override_path(keys: list[str], text: str) -> None:
    """Reject an override whose key is not in the schema, before it touches the tree.

    Dict-valued fields (data.tasks) accept any name: that is how a new task is added.
    """
    annotation: Any = Config
    for depth, key in enumerate(keys):
        path = ".".join(keys[:depth])
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            hints = field_types(annotation)
            if key not in hints:
                raise unknown_key_error(path, key, list(hints))
            annotation = hints[key]
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            raise ConfigError(
                f"override '{text}' goes below '{path}', which holds {describe(annotation)}, "
                "not a section",
                field=".".join(keys),
                fix=f"set {path}=<value> instead",
            )
        # `X | None` sections are not used, but unwrap Optional so the walk stays general.
        args = typing.get_args(annotation)
        if type(None) in args and len(args) == 2:
            annotation = next(a for a in args if a is not type(None))


def set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set `tree[k0][k1]...[kn] = value`, creating (or un-nulling) sections on the way."""
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            path = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"cannot set '{'.'.join(keys)}': '{path}' is not a section",
                field=path,
                value=child,
                fix=f"set {path}=<value> instead",
            )
        node = child
    node[keys[-1]] = value


def _apply_overrides_to_tree(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    if isinstance(overrides, str):
        # A bare string would be iterated character by character: almost surely a mistake.
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for text in overrides:
        keys, value = parse_override(text)
        _check_override_path(keys, text)
        set_dotted(tree, keys, value)
    return tree


# --------------------------------------------------------------------------- public API
def from_dict(data: Mapping[str, Any]) -> Config:
    """Typed `Config` from a plain nested dict; unknown keys and bad types raise. No validation."""
    return coerce(data, Config, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of `cfg` (tuples become lists) that YAML can hold."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if isinstance(obj, Mapping):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    return plain(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> Path:
    """Write `cfg` as YAML that `load_config` reads back to an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))
    return path


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with includes), apply `key=value` overrides, convert, validate.

    `path=None` starts from the defaults. World-size rules are not checked here (the world
    size is not known yet): call `validate(cfg, world_size=N)` once it is.
    """
    tree = load_yaml_tree(path) if path is not None else {}
    tree = _apply_overrides_to_tree(tree, overrides)
    return validate(from_dict(tree))


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated `Config`: `cfg` with `key=value` overrides applied (`cfg` unchanged)."""
    tree = _apply_overrides_to_tree(to_dict(cfg), overrides)
    return validate(from_dict(tree))
