"""Plain-Python payload checks generated from the registry's JSON Schemas, for the hot path.

fastjsonschema costs 2-3 µs per payload, mostly on bookkeeping for error messages that a valid
payload never needs. A check generated here answers only "surely valid?" in a fraction of that:
it is stricter than the schema (e.g. `integer` means a Python int, never 2.0), so True implies
the schema holds, and False sends the payload to fastjsonschema, which has the final word and
words the rejection. A schema using a keyword not handled here gets no fast check at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

FastCheck = Callable[[Any], bool]

# keywords that never change whether a payload is valid
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples"}
)
_HANDLED = frozenset(
    {"type", "required", "properties", "items", "minLength", "maxLength", "pattern", "minimum"}
)
# a Python type test per JSON type, exact types only (orjson makes no subclasses; bool is no number)
_TYPE_TESTS = {
    "object": "type({v}) is dict",
    "array": "type({v}) is list",
    "string": "type({v}) is str",
    "integer": "type({v}) is int",
    "number": "(type({v}) is float or type({v}) is int)",
    "boolean": "type({v}) is bool",
    "null": "{v} is None",
}


class Unsupported(Exception):
    """The schema uses something the generator does not handle: no fast check for it."""


def compile_check(schema: dict) -> FastCheck | None:
    """A function returning True only for payloads that surely satisfy `schema`, or None."""
    namespace: dict[str, Any] = {"_MISSING": object()}
    try:
        body = _node(schema, "d0", 1, namespace)
    except Unsupported:
        return None
    source = "def check(d0):\n" + "".join(body) + "    return True\n"
    # generated from the repo's own schemas; names and patterns enter as literals via repr()
    exec(compile(source, "<fastcheck>", "exec"), namespace)
    check = namespace["check"]
    check.source = source  # the generated code, for whoever debugs a verdict
    return check


def _fresh(ns: dict, prefix: str) -> str:
    """A new name in the generated function: nested checks never overwrite an outer variable."""
    ns["_names"] = ns.get("_names", 0) + 1
    return f"{prefix}{ns['_names']}"


def _node(schema: Any, var: str, depth: int, ns: dict) -> list[str]:
    if not isinstance(schema, dict):
        raise Unsupported(f"schema node {schema!r}")
    unknown = set(schema) - _HANDLED - _ANNOTATIONS
    if unknown:
        raise Unsupported(", ".join(sorted(unknown)))
    pad = "    " * depth
    lines: list[str] = []
    json_type = schema.get("type")
    if isinstance(json_type, list) and set(schema) - _ANNOTATIONS == {"type"}:
        # e.g. ["string", "null"]; a union with further keywords would need per-type rules
        if not json_type or not set(json_type) <= set(_TYPE_TESTS):
            raise Unsupported(f"type {json_type!r}")
        tests = " or ".join(_TYPE_TESTS[t].format(v=var) for t in json_type)
        return [f"{pad}if not ({tests}): return False\n"]
    if not isinstance(json_type, str) or json_type not in _TYPE_TESTS:
        raise Unsupported(f"type {json_type!r}")  # also: no type at all
    lines.append(f"{pad}if not {_TYPE_TESTS[json_type].format(v=var)}: return False\n")
    if "minLength" in schema or "maxLength" in schema or "pattern" in schema:
        if json_type != "string":
            raise Unsupported("string keywords on a non-string")
        if "minLength" in schema:
            lines.append(f"{pad}if len({var}) < {int(schema['minLength'])}: return False\n")
        if "maxLength" in schema:
            lines.append(f"{pad}if len({var}) > {int(schema['maxLength'])}: return False\n")
        if "pattern" in schema:
            name = _fresh(ns, "_pattern")
            # re.search, as JSON Schema patterns are unanchored (and as fastjsonschema does)
            ns[name] = re.compile(schema["pattern"]).search
            lines.append(f"{pad}if {name}({var}) is None: return False\n")
    if "minimum" in schema:
        if json_type not in ("integer", "number"):
            raise Unsupported("minimum on a non-number")
        lines.append(f"{pad}if {var} < {float(schema['minimum'])!r}: return False\n")
    if "required" in schema or "properties" in schema:
        if json_type != "object":
            raise Unsupported("object keywords on a non-object")
        required = list(schema.get("required", ()))
        properties = schema.get("properties", {})
        for name in required:
            child = _fresh(ns, "v")
            lines.append(f"{pad}{child} = {var}.get({str(name)!r}, _MISSING)\n")
            if name in properties:  # its type test also fails on _MISSING
                lines += _node(properties[name], child, depth, ns)
            else:
                lines.append(f"{pad}if {child} is _MISSING: return False\n")
        for name, sub in properties.items():
            if name in required:
                continue
            child = _fresh(ns, "v")
            lines.append(f"{pad}{child} = {var}.get({str(name)!r}, _MISSING)\n")
            lines.append(f"{pad}if {child} is not _MISSING:\n")
            lines += _node(sub, child, depth + 1, ns)
    if "items" in schema:
        if json_type != "array":
            raise Unsupported("items on a non-array")
        child = _fresh(ns, "v")
        lines.append(f"{pad}for {child} in {var}:\n")
        lines += _node(schema["items"], child, depth + 1, ns)
    return lines
