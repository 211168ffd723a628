"""The configuration walker: one group's values against its dataclass (``config_schema``),
each scalar as its field's own type, unknown keys, then every field's range and choices (field
metadata, ``config_fields.spec``), then the rules that tie its fields together (``rules``, by
dataclass: ``config_check.RULES``; or a settings class's own ``check``, as a method plugin may
define); one line per refusal."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from loki_exp.errors import LokiError

Rules = Mapping[type, Callable[[Any, str], None]]


def check_group(at: str, value: Any, schema: type | Mapping[str, type], shape_key: str | None,
                rules: Rules | None = None) -> Any:
    if not isinstance(value, dict):
        raise LokiError(f"{at}={value!r} must be a mapping of settings")
    if isinstance(schema, Mapping):
        choice = value.get(shape_key)
        if choice not in schema:
            raise LokiError(f"{at}.{shape_key}={choice!r} is not known; expected one of "
                            f"{list(schema)}")
        schema = schema[choice]
    _check_types(at, value, schema)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except MissingMandatoryValue as err:
        raise LokiError(f"{_join(at, err.full_key)} is not set; expected "
                        f"{_type_words(_hint(schema, err.full_key))}") from None
    except ConfigKeyError as err:
        known = [f.name for f in dataclasses.fields(_owner(schema, err.full_key))]
        raise LokiError(f"{_join(at, err.full_key)} is not a known key; expected one of "
                        f"{known}") from None
    except OmegaConfBaseException as err:  # e.g. a scalar given for a nested group
        raise LokiError(f"{_join(at, err.full_key)}: {err.msg.splitlines()[0]}") from None
    _walk(at, obj, rules or {})
    return obj


def _check_types(at: str, value: dict[str, Any], schema: type) -> None:
    """Each scalar as the field's own type. OmegaConf would convert instead ('10' to 10, 1 to
    '1', 'yes' to true) and the run reads the unconverted config, so a quoted number would
    pass here and fail in a stage."""
    hints = typing.get_type_hints(schema)
    for key, item in value.items():
        hint = hints.get(key)
        if hint is None or item is None:
            continue  # an unknown key (OmegaConf names it) or null (OmegaConf checks Optional)
        base = _base(hint)
        where = _join(at, key)
        if dataclasses.is_dataclass(base) and isinstance(item, dict):
            _check_types(where, item, base)
        elif base is list and isinstance(item, list):
            inner = _base(typing.get_args(_strip_optional(hint))[0])
            bad = [v for v in item if not _is(v, inner)]
            if bad:
                raise LokiError(f"{where} has {bad}: each must be {TYPE_WORDS[inner]}")
        elif not _is(item, base):
            raise LokiError(f"{where}={item!r} must be {_type_words(hint)}")


def _is(value: Any, base: Any) -> bool:
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, base) if base in TYPE_WORDS else True


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) else hint


def _base(hint: Any) -> Any:
    bare = _strip_optional(hint)
    return typing.get_origin(bare) or bare


def _hint(schema: type, full_key: str) -> Any:
    return typing.get_type_hints(_owner(schema, full_key)).get(full_key.split(".")[-1])


def _owner(schema: type, full_key: str) -> type:
    """The dataclass that holds the last part of ``full_key``."""
    for part in full_key.split(".")[:-1]:
        nested = _base(typing.get_type_hints(schema).get(part))
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            schema = nested
    return schema


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              list: "a list", dict: "a mapping"}


def _type_words(hint: Any) -> str:
    base = _base(hint)
    words = "a mapping" if dataclasses.is_dataclass(base) else TYPE_WORDS.get(base, "a value")
    return f"{words} or null" if _strip_optional(hint) is not hint else words


def _join(at: str, key: Any) -> str:
    return f"{at}.{key}" if at else str(key)


def _walk(at: str, obj: Any, rules: Rules) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = _join(at, f.name)
        _check_field(where, value, f.metadata)
        if dataclasses.is_dataclass(value):
            _walk(where, value, rules)
    rule = next((rules[c] for c in type(obj).__mro__ if c in rules), None)
    if rule is not None:
        rule(obj, at)
    elif hasattr(obj, "check"):
        obj.check(at)


def _show(value: Any) -> str:
    """A value as the user wrote it: OmegaConf turns quota=0 into 0.0 in a float field."""
    return f"{value:g}" if isinstance(value, float) and value.is_integer() else repr(value)


def _check_field(at: str, value: Any, meta: Any) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if isinstance(value, list):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise LokiError(f"{at} has {bad}; expected some of {allowed}")
        elif value not in allowed:
            raise LokiError(f"{at}={value!r} is not known; expected one of {allowed}")
    low, high = (meta.get("ge"), meta.get("gt")), (meta.get("le"), meta.get("lt"))
    if low == (None, None) and high == (None, None):
        return
    ok = not math.isnan(value) \
        and (low[0] is None or value >= low[0]) and (low[1] is None or value > low[1]) \
        and (high[0] is None or value <= high[0]) and (high[1] is None or value < high[1])
    if not ok:
        raise LokiError(f"{at}={_show(value)} must be {_range_words(value, meta)}")


def _range_words(value: Any, meta: Any) -> str:
    kind = "an integer" if isinstance(value, int) else "a number"
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    if (ge, gt, le, lt) in ((1, None, None, None), (None, 0, None, None)):
        return f"a positive {kind.split()[1]}"
    if (le, lt) == (None, None):
        return f"{kind} >= {ge:g}" if ge is not None else f"{kind} > {gt:g}"
    left = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else "(-inf"
    right = f"{le:g}]" if le is not None else f"{lt:g})"
    return f"{kind} in {left}, {right}"
