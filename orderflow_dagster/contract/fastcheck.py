"""msgspec types generated from the registry's JSON Schemas, for the hot path.

fastjsonschema costs 2-3 µs per payload, mostly on bookkeeping for error messages that a valid
payload never needs. The types generated here answer only "surely valid?", in C:

- `compile_decoder` reads a payload's raw JSON bytes straight into a typed struct. It is strict
  in a way that lets landing trust it with the bytes themselves: unknown fields are refused
  (msgspec would skip them unread: neither their UTF-8 nor their numbers checked), integers must
  fit 64 bits and numbers a double (what orjson, and so the thorough path, can represent), and
  every number literal must be one PostgreSQL's numeric (so jsonb) stores as written. Numeric
  keeps at most 16383 decimals, counted as written: `0e-99999`, `1e-16384` or a fraction of
  20,000 digits fail the landing's COPY. A nonzero double's literal has fewer decimals than
  324 plus its own length, so the decoder refuses payloads of `MAX_RAW_PAYLOAD_BYTES` or more
  and, in a number field, zero (any literal that reads as 0.0, however long): the thorough path
  stores those re-encoded. A number field whose range holds zero between negatives and positives
  cannot refuse zero that way, and its schema gets no raw decoder.
- `compile_check` checks an already parsed payload (a dict), where unknown fields are fine.

Both are stricter than the schema (`integer` is never 2.0, a boolean is never a number), so a
pass implies the schema holds; a refusal sends the payload to the thorough path, where
fastjsonschema has the final word and words the rejection. A schema using a keyword not handled
here gets no fast path at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple, Union

import msgspec

FastCheck = Callable[[Any], bool]
RawDecoder = Callable[[Any], bool]

# keywords that never change whether a payload is valid
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples"}
)
_HANDLED = frozenset(
    {
        "type",
        "required",
        "properties",
        "items",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
    }
)
# orjson reads an int beyond 64 bits as a float, which a JSON Schema `integer` refuses; msgspec
# bounds only to int64, which is stricter still
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# fastjsonschema compares a 64-bit integer with a number's bound exactly, msgspec compares the
# integer's double: the same verdict only while every integer near the bound is a double
_EXACT_DOUBLE_INTEGERS = 2**53
# with fewer bytes, a nonzero double's literal has fewer than 16000 + 324 decimals, within the
# 16383 numeric keeps (see the module docstring)
MAX_RAW_PAYLOAD_BYTES = 16_000
_SCALARS: dict[str, Any] = {
    "string": str,
    "integer": Annotated[int, msgspec.Meta(ge=_INT_MIN, le=_INT_MAX)],
    "number": float,  # msgspec reads an int into it too, and refuses beyond a double's range
    "boolean": bool,
    "null": None,
}
# what msgspec raises for a value it refuses (nesting too deep included)
DECODE_FAILED = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)
# the `$` fastjsonschema turns into `\Z` (its DOLLAR_FINDER): every one not escaped
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


class Unsupported(Exception):
    """The schema uses something the generator does not handle: no fast path for it."""


def compile_type(
    schema: dict, *, forbid_unknown_fields: bool, stored_as_written: bool = False
) -> Any:
    """The msgspec type a payload of `schema` must have; raises Unsupported. With
    `stored_as_written`, its number fields also refuse zero (see the module docstring)."""
    return _node(schema, "Payload", _Mode(forbid_unknown_fields, stored_as_written))


def compile_decoder(schema: dict) -> RawDecoder | None:
    """A function of raw JSON (bytes or msgspec.Raw): True only if it surely satisfies `schema`,
    holds nothing unread and every number in it is stored as written, else False. None if the
    schema has no fast path."""
    try:
        target = compile_type(schema, forbid_unknown_fields=True, stored_as_written=True)
    except Unsupported:
        return None
    decode = msgspec.json.Decoder(target).decode

    def passes(raw: Any) -> bool:
        if len(raw) >= MAX_RAW_PAYLOAD_BYTES:
            return False
        try:
            decode(raw)
        except DECODE_FAILED:
            return False
        return True

    return passes


def compile_check(schema: dict) -> FastCheck | None:
    """A function returning True only for parsed payloads that surely satisfy `schema`."""
    try:
        target = compile_type(schema, forbid_unknown_fields=False)
    except Unsupported:
        return None
    return _verdict(lambda payload: msgspec.convert(payload, target))


class _Mode(NamedTuple):
    forbid_unknown_fields: bool
    stored_as_written: bool


def _verdict(read: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """True where `read` succeeds, False where msgspec refuses the value."""

    def passes(value: Any) -> bool:
        try:
            read(value)
        except DECODE_FAILED:
            return False
        return True

    return passes


def _node(schema: Any, name: str, mode: _Mode) -> Any:
    if not isinstance(schema, dict):
        raise Unsupported(f"schema node {schema!r}")
    unknown = set(schema) - _HANDLED - _ANNOTATIONS
    if unknown:
        raise Unsupported(", ".join(sorted(unknown)))
    json_type = schema.get("type")
    if isinstance(json_type, list):
        # e.g. ["string", "null"]; a union with further keywords would need per-type rules
        if set(schema) - _ANNOTATIONS != {"type"} or not json_type:
            raise Unsupported(f"type {json_type!r} with further keywords")
        if not set(json_type) <= set(_SCALARS) or len(set(json_type)) != len(json_type):
            raise Unsupported(f"type {json_type!r}")
        if "integer" in json_type and "number" in json_type:
            raise Unsupported("integer beside number")  # msgspec would read 2 as the int
        if "number" in json_type and mode.stored_as_written:
            raise Unsupported("a number that may be zero")
        return Union[tuple(_SCALARS[t] for t in json_type)]  # noqa: UP007 (built at runtime)
    if json_type == "object":
        return _object(schema, name, mode)
    if json_type == "array":
        if "items" not in schema or set(schema) - _ANNOTATIONS != {"type", "items"}:
            raise Unsupported("an array needs exactly `items`")  # else: items read as Any
        return list[_node(schema["items"], name + "Item", mode)]
    if json_type not in _SCALARS or json_type == "null":
        raise Unsupported(f"type {json_type!r}")  # also: no type at all
    return _scalar(schema, json_type, mode)


def _scalar(schema: dict, json_type: str, mode: _Mode) -> Any:
    meta: dict[str, Any] = {}
    if {"minLength", "maxLength", "pattern"} & set(schema):
        if json_type != "string":
            raise Unsupported("string keywords on a non-string")
        if "minLength" in schema:
            meta["min_length"] = int(schema["minLength"])
        if "maxLength" in schema:
            meta["max_length"] = int(schema["maxLength"])
        if "pattern" in schema:
            # msgspec searches (unanchored), as JSON Schema patterns and fastjsonschema do; and
            # like fastjsonschema, `$` means the end of the string (ECMA), not "before a final
            # newline" (Python): "USD\n" must not match "^[A-Z]{3}$"
            pattern = _UNESCAPED_DOLLAR.sub(r"\\Z", schema["pattern"])
            try:
                re.compile(pattern)
            except re.error as exc:  # e.g. a `$` inside a character set
                raise Unsupported(f"pattern {schema['pattern']!r}: {exc}") from exc
            meta["pattern"] = pattern
    bounds = {key: schema[key] for key in ("minimum", "maximum") if key in schema}
    if json_type == "integer":
        if any(type(bound) is not int for bound in bounds.values()):
            raise Unsupported(f"bounds {bounds!r} on an integer")
        if bounds:
            low = max(bounds.get("minimum", _INT_MIN), _INT_MIN)
            high = min(bounds.get("maximum", _INT_MAX), _INT_MAX)
            return Annotated[int, msgspec.Meta(ge=low, le=high)]
    elif json_type == "number":
        if any(
            type(bound) not in (int, float) or not abs(bound) < _EXACT_DOUBLE_INTEGERS
            for bound in bounds.values()
        ):
            raise Unsupported(f"bounds {bounds!r} on a number")
        if "minimum" in bounds:
            meta["ge"] = float(bounds["minimum"])
        if "maximum" in bounds:
            meta["le"] = float(bounds["maximum"])
        if mode.stored_as_written:
            # refuse zero, whose literal may hold any number of decimals
            low, high = meta.get("ge"), meta.get("le")
            if low is not None and low >= 0:
                if low == 0:
                    meta["gt"] = meta.pop("ge")
            elif high is not None and high <= 0:
                if high == 0:
                    meta["lt"] = meta.pop("le")
            else:
                raise Unsupported("a number that may be zero between negatives and positives")
    elif bounds:
        raise Unsupported(f"bounds {bounds!r} on {json_type}")
    base = _SCALARS[json_type]
    return Annotated[base, msgspec.Meta(**meta)] if meta else base


def _object(schema: dict, name: str, mode: _Mode) -> Any:
    if set(schema) - _ANNOTATIONS - {"type", "required", "properties"}:
        raise Unsupported("object with non-object keywords")
    if "properties" not in schema:
        raise Unsupported("an object needs `properties`")  # else: its fields read as Any
    required = list(schema.get("required", ()))
    properties = schema["properties"]
    if len(set(required)) != len(required) or not set(required) <= set(properties):
        raise Unsupported("a required field without a schema")
    fields: list[tuple[str, Any, Any]] = []
    names = iter(f"f{i}" for i in range(len(properties)))
    # attribute names are generated; the JSON names enter only through `field(name=...)`
    for json_name in required:
        kind = _node(properties[json_name], name + "_" + json_name, mode)
        fields.append((next(names), kind, msgspec.field(name=json_name)))
    for json_name, sub in properties.items():
        if json_name not in required:
            kind = _node(sub, name + "_" + json_name, mode)
            fields.append((next(names), kind, msgspec.field(default=None, name=json_name)))
    return msgspec.defstruct(
        re.sub(r"\W", "_", name), fields, forbid_unknown_fields=mode.forbid_unknown_fields, gc=False
    )
