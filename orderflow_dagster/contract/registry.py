"""The schema registry: `schemas/<EventType>/v<N>.json`, compiled once at import.

Adding a version is adding a file (and an upcaster, see upcast.py); nothing here changes.
Schemas describe required fields and their types only: readers ignore unknown fields, so
`additionalProperties` stays open and a producer may add fields before readers know them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import fastjsonschema

from orderflow_dagster.contract.fastcheck import (
    FastCheck,
    RawDecoder,
    compile_check,
    compile_decoder,
)

SCHEMA_DIR = "schemas"
_VERSION_FILE = re.compile(r"v(\d+)\.json")

Validator = Callable[[Any], Any]


def _load() -> tuple[dict[tuple[str, int], dict], dict[tuple[str, int], Validator]]:
    schemas: dict[tuple[str, int], dict] = {}
    validators: dict[tuple[str, int], Validator] = {}
    root = resources.files("orderflow_dagster.contract").joinpath(SCHEMA_DIR)
    for type_dir in sorted(root.iterdir(), key=lambda p: p.name):
        if not type_dir.is_dir():
            continue
        for file in sorted(type_dir.iterdir(), key=lambda p: p.name):
            match = _VERSION_FILE.fullmatch(file.name)
            if match is None:
                continue
            key = (type_dir.name, int(match.group(1)))
            schemas[key] = json.loads(file.read_text())
            # fastjsonschema generates and compiles Python code for the schema: a few µs a call
            validators[key] = fastjsonschema.compile(schemas[key])
    return schemas, validators


SCHEMAS, _VALIDATORS = _load()
EVENT_TYPES: tuple[str, ...] = tuple(sorted({t for t, _ in SCHEMAS}))
SUPPORTED_VERSIONS: dict[str, frozenset[int]] = {
    t: frozenset(v for tt, v in SCHEMAS if tt == t) for t in EVENT_TYPES
}
LATEST_VERSION: dict[str, int] = {t: max(v) for t, v in SUPPORTED_VERSIONS.items()}
# the hot path's first opinion: True means surely valid; anything else asks fastjsonschema
_FAST_CHECKS: dict[tuple[str, int], FastCheck] = {
    key: check for key, schema in SCHEMAS.items() if (check := compile_check(schema)) is not None
}
# the landing's first look at a payload's raw bytes: True means surely valid and nothing unread
RAW_DECODERS: dict[tuple[str, int], RawDecoder] = {
    key: decode
    for key, schema in SCHEMAS.items()
    if (decode := compile_decoder(schema)) is not None
}


def payload_violation(event_type: str, version: int, payload: Any) -> str | None:
    """None if `payload` satisfies the schema of (event_type, version), else why not."""
    fast = _FAST_CHECKS.get((event_type, version))
    if fast is not None and fast(payload):
        return None
    try:
        _VALIDATORS[(event_type, version)](payload)
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message.replace("data", "payload", 1)
    return None
