"""One declared table of request fields: the validator, the OpenAPI schema and the published options
are all read from it, so a new field is one row, not checks in three places.

Why not pydantic: the limits depend on the settings (prompt length, image sides), the API is described
as OpenAPI 3.0 (``nullable``; pydantic emits JSON Schema 2020-12 ``anyOf`` with ``null``), and every
error must name the offending value in our own words (``num_images=5 is not between 1 and 4``). A small
table of typed rows does all three with ~150 lines and no translation layer.

A row's limits may be callables of the settings (``lambda s: s.max_image_side``). ``null`` in a request
means "the default", as before. Rules that tie fields together (width with height) stay in code next to
the request class, after the per-field checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from utils.errors import InvalidRequest

_KINDS = ("string", "integer", "number", "boolean", "object", "array")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str                                  # one of _KINDS
    doc: str = ""
    required: bool = False
    default: Any = None                        # value or callable(settings)
    minimum: Any = None                        # number or callable(settings)
    maximum: Any = None
    multiple_of: int | None = None
    enum: Sequence[str] | Callable[[Any], Sequence[str]] | None = None  # arrays: the allowed items
    max_items: int | None = None               # arrays of strings (unique items)
    min_length: int | None = None              # strings, after stripping
    max_length: Any = None                     # strings: number or callable(settings)
    strip: bool = False                        # strings: surrounding white space is dropped first
    message: str | None = None                 # one message for any violation: {name} {value!r} {minimum} {maximum}
    check: Callable[[Any, Any], Any] | None = None  # (value, settings) -> value; raises InvalidRequest
    schema_extra: Mapping[str, Any] = field(default_factory=dict)  # OpenAPI-only keywords (pattern…)
    published: bool = True                     # listed in /system-status options (request_fields)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"field {self.name}: kind={self.kind!r} is not one of {_KINDS}")

    # --- settings-dependent values ---
    @staticmethod
    def _resolve(v: Any, settings: Any) -> Any:
        return v(settings) if callable(v) else v

    def limits(self, settings: Any) -> tuple[Any, Any]:
        return self._resolve(self.minimum, settings), self._resolve(self.maximum, settings)

    def choices(self, settings: Any) -> list[str] | None:
        e = self._resolve(self.enum, settings)
        return None if e is None else list(e)

    def default_value(self, settings: Any) -> Any:
        return self._resolve(self.default, settings)

    # --- validation ---
    def _fail(self, value: Any, settings: Any, fallback: str) -> InvalidRequest:
        lo, hi = self.limits(settings)
        text = (self.message or fallback).format(name=self.name, value=value, minimum=lo, maximum=hi)
        return InvalidRequest(text)

    def validate(self, value: Any, settings: Any) -> Any:
        name, lo, hi = self.name, *self.limits(settings)
        if self.kind == "string":
            if not isinstance(value, str):
                raise self._fail(value, settings, "{name}={value!r} must be a string")
            text = value.strip() if self.strip else value
            if self.min_length and len(text) < self.min_length:
                raise self._fail(value, settings, "{name}={value!r} must be a non-empty string"
                                 if self.min_length == 1 else "{name}={value!r} is shorter than %d" % self.min_length)
            value = text
            choices = self.choices(settings)
            if choices is not None and value not in choices:
                raise self._fail(value, settings, "{name}={value!r} is not one of " + ", ".join(choices))
            max_len = self._resolve(self.max_length, settings)
            if max_len is not None and len(value) > max_len:
                if self.message:
                    raise self._fail(value, settings, "")
                raise InvalidRequest(f"{name} has {len(value)} characters; at most {max_len} are allowed")
        elif self.kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
            ok = ok and (not self.multiple_of or value % self.multiple_of == 0)
            if not ok:
                raise self._fail(value, settings, "{name}={value!r} is not an integer between {minimum} and {maximum}")
        elif self.kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._fail(value, settings, "{name}={value!r} is not a number")
            if not math.isfinite(value):
                raise self._fail(value, settings, "{name}={value!r} is not a finite number")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise self._fail(value, settings, "{name}={value!r} is not between {minimum} and {maximum}")
            value = float(value)
        elif self.kind == "boolean":
            if not isinstance(value, bool):
                raise self._fail(value, settings, "{name}={value!r} is not true or false")
        elif self.kind == "array":
            choices = self.choices(settings)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self._fail(value, settings, "{name}={value!r} is not a list of strings")
            bad = [v for v in value if choices is not None and v not in choices]
            if bad:
                raise self._fail(value, settings, "{name}: " + ", ".join(map(repr, bad[:5]))
                                 + " not one of " + ", ".join(choices or ()))
            if len(set(value)) != len(value) or (self.max_items is not None and len(value) > self.max_items):
                raise self._fail(value, settings, "{name}={value!r} must list each item once"
                                 + (f", at most {self.max_items}" if self.max_items is not None else ""))
        elif self.kind == "object":
            if not isinstance(value, dict):
                raise self._fail(value, settings, "{name}={value!r} is not a JSON object")
        if self.check is not None:
            value = self.check(value, settings)
        return value

    # --- description ---
    def schema(self, settings: Any) -> dict[str, Any]:
        """This field as an OpenAPI 3.0 schema object."""
        s: dict[str, Any] = {"type": self.kind}
        lo, hi = self.limits(settings)
        if lo is not None:
            s["minimum"] = lo
        if hi is not None:
            s["maximum"] = hi
        if self.multiple_of:
            s["multipleOf"] = self.multiple_of
        choices = self.choices(settings)
        if self.kind == "array":
            s["items"] = {"type": "string", **({"enum": choices} if choices is not None else {})}
            s["uniqueItems"] = True
            if self.max_items is not None:
                s["maxItems"] = self.max_items
        elif choices is not None:
            s["enum"] = choices
        max_len = self._resolve(self.max_length, settings)
        if max_len is not None:
            s["maxLength"] = max_len
        if self.min_length:
            s["minLength"] = self.min_length
        if self.doc:
            s["description"] = self.doc
        s.update(self.schema_extra)
        if not self.required:
            s["nullable"] = True
        return s

    def published_entry(self, settings: Any) -> dict[str, Any]:
        """What a client needs to offer this field: type, default, limits, choices."""
        lo, hi = self.limits(settings)
        entry = {"type": self.kind, "default": self.default_value(settings), "required": self.required}
        entry.update({k: v for k, v in (("minimum", lo), ("maximum", hi), ("enum", self.choices(settings)),
                                         ("multiple_of", self.multiple_of)) if v is not None})
        if self.doc:
            entry["doc"] = self.doc
        return entry


def validate_payload(fields: Sequence[Field], payload: Any, settings: Any) -> dict[str, Any]:
    """Every declared field's value (defaults filled in), or InvalidRequest naming the first bad one."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {type(payload).__name__}")
    names = [f.name for f in fields]
    unknown = sorted(set(map(str, payload)) - set(names))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(names)}")
    values: dict[str, Any] = {}
    for f in fields:
        v = payload.get(f.name)
        if v is None:
            if f.required:
                raise InvalidRequest(f"{f.name}=None is required" if f.kind != "string"
                                     else f"{f.name}=None must be a non-empty string")
            values[f.name] = f.default_value(settings)
            continue
        values[f.name] = f.validate(v, settings)
    return values


def object_schema(fields: Sequence[Field], settings: Any, *, description: str = "",
                  extra_properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The request body as one OpenAPI object (unknown fields refused)."""
    props = {f.name: f.schema(settings) for f in fields}
    props.update(extra_properties or {})
    s: dict[str, Any] = {"type": "object", "additionalProperties": False,
                         "required": [f.name for f in fields if f.required], "properties": props}
    if description:
        s["description"] = description
    return s


def published_fields(fields: Sequence[Field], settings: Any) -> dict[str, dict[str, Any]]:
    return {f.name: f.published_entry(settings) for f in fields if f.published}
