"""`--set field=value`, parsed once into typed values, and a config built from them once.

A run's config is a nested frozen dataclass (TrainConfig). Its fields are named by dotted
paths ('model.d_model', 'optimizer.warmup_steps'), and every layer of a run's values (the
platform's defaults, the recipe sized for the run, the flags) is a mapping from those paths
to typed values: `parse_assignments` turns the user's strings into one, naming the field and
the fix for a bad one, and `with_values` builds the config from such a mapping, each
dataclass once, so its checks (`__post_init__`) see only the final values.

Generic over the root dataclass (it knows no field of TrainConfig by name).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping

from .model_config import ConfigError, suggest

# How people type booleans; anything else is refused, naming the field.
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def field_types(cls, prefix: str = "") -> dict[str, str]:
    """{'model.d_model': 'int', ...} for every leaf field of a nested config dataclass: the
    annotation as written, which is how messages and `--help-fields` name a field's type."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(field_types(type(default), prefix + f.name + "."))
        else:
            out[prefix + f.name] = str(f.type)
    return out


def field_hint(cls, dotted: str):
    """The resolved type of a dotted leaf field ('mesh.layout' -> Literal['dp', ...])."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        cls = typing.get_type_hints(cls)[name]
    return typing.get_type_hints(cls)[leaf]


def _unknown_field(key: str, known: Mapping[str, str], item: str) -> ConfigError:
    return ConfigError(f"--set {item!r}: there is no field {key!r}.{suggest(key, known)} "
                       f"`magic train --help-fields` lists them all.")


def parse_value(hint, text: str):
    """`text` as a value of type `hint` (int, float, str, bool, a Literal of strings, or one of
    those or None); ValueError, with the reason, when it is not one."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] or X | None: 'None', else an X
        if text == "None":
            return None
        (inner,) = [t for t in typing.get_args(hint) if t is not type(None)]
        try:
            return parse_value(inner, text)
        except ValueError as e:
            raise ValueError(f"{e}; or None") from None
    if hint is bool:
        if text.lower() not in BOOLEANS:
            raise ValueError("use true or false")
        return BOOLEANS[text.lower()]
    if hint in (int, float):
        return hint(text)  # Python's own syntax and message: '1_000' and ' 5' are numbers, '1e23' no int
    if hint is str or typing.get_origin(hint) is typing.Literal:  # a Literal's choices are checked before
        return text
    raise TypeError(f"a config field of type {hint} has no --set syntax yet: add it to parse_value")


def parse_assignments(cls, assignments: Iterable[str]) -> dict[str, Any]:
    """'dotted.field=value' strings as {dotted field: typed value} for the dataclass `cls`:
    the one place the user's strings are read. A field given twice takes its last value (the
    earlier one is not read). A missing '=', an unknown field (with the close name), a value
    outside a Literal's choices or one not of the field's type raises ConfigError naming it."""
    known = field_types(cls)
    last: dict[str, str] = {}
    for item in assignments:
        last[item.partition("=")[0].strip()] = item
    values = {}
    for key, item in last.items():
        _, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is invalid: write it as field=value, e.g. --set steps=500.")
        if key not in known:
            raise _unknown_field(key, known, item)
        hint = field_hint(cls, key)
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        if choices and text not in choices:
            raise ConfigError(f"--set {item!r}: {key} must be one of {', '.join(choices)}.{suggest(text, choices)}")
        try:
            values[key] = parse_value(hint, text)
        except ValueError as e:
            raise ConfigError(f"--set {item!r}: {key} expects {known[key]}, and {text!r} is not one ({e}).") from None
    return values


def with_values(config, values: Mapping[str, Any]):
    """`config` with the dotted fields of `values` replaced. Each nested dataclass that changes
    is built once, in field order, before its parent, so a cross-field check sees the final
    values of both fields, and its error names the field as the user wrote it."""
    known = field_types(type(config))
    for key in values:
        if key not in known:
            raise _unknown_field(key, known, f"{key}={values[key]}")
    own: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        nested = {k.partition(".")[2]: v for k, v in values.items() if k.partition(".")[0] == f.name and "." in k}
        if nested:
            own[f.name] = with_values(getattr(config, f.name), nested)
        elif f.name in values:
            own[f.name] = _as_field_type(field_hint(type(config), f.name), values[f.name])
    return dataclasses.replace(config, **own) if own else config


def _as_field_type(hint, value):
    """An int given for a float field as the float it means, as parsing '0' for a float gives
    0.0: the run's hash (train/rundir.py) reads the config's JSON, where 0 and 0.0 differ."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def values_of(config, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, Any]:
    """The leaf fields of a (nested) config as {dotted field: value}, the names in `skip` left out:
    a config read back as a layer of values (what `--init-from` inherits from a run's model)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(values_of(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out
