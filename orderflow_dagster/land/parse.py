"""Turning one Kafka record into a COPY line, or into a dead letter with a reason. Pure, hot path.

Everything here runs once per message, so it avoids work it can skip. Two paths, one verdict:
- the fast path reads the envelope with msgspec straight into typed fields, keeps the payload's
  raw bytes (no re-encoding) and checks them with the type generated from its schema. It only
  ever accepts, and only what the thorough path accepts too, with the same fields: it refuses
  anything it would leave unread (an unknown field) or that the thorough path reads differently;
- the thorough path (orjson, then the registry's validators) handles everything else, words every
  rejection and re-encodes the payload.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated

import msgspec
import orjson

from orderflow_dagster.contract import registry
from orderflow_dagster.contract.fastcheck import DECODE_FAILED


class Reason:
    """The fixed set of dead-letter reason codes (documented in docs/dead-letters.md)."""

    INVALID_JSON = "invalid_json"  # not UTF-8 JSON at all (also: empty/tombstone values)
    NOT_AN_OBJECT = "not_an_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # an envelope field is absent
    INVALID_FIELD = "invalid_field"  # an envelope field has the wrong type or range
    INVALID_EVENT_ID = "invalid_event_id"  # event_id is not a UUID
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    PAYLOAD_SCHEMA_VIOLATION = "payload_schema_violation"
    UNSTORABLE_VALUE = "unstorable_value"  # e.g. \u0000, which PostgreSQL text/jsonb cannot hold
    OVERSIZE = "oversize"

    ALL = (
        INVALID_JSON,
        NOT_AN_OBJECT,
        MISSING_FIELD,
        INVALID_FIELD,
        INVALID_EVENT_ID,
        UNKNOWN_EVENT_TYPE,
        UNSUPPORTED_SCHEMA_VERSION,
        PAYLOAD_SCHEMA_VIOLATION,
        UNSTORABLE_VALUE,
        OVERSIZE,
    )


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str


# Which (event_type, schema_version) exist and what their payloads must hold: the registry.
SUPPORTED_VERSIONS = registry.SUPPORTED_VERSIONS

ENVELOPE_FIELDS = (
    "event_id",
    "aggregate_id",
    "event_type",
    "payload",
    "timestamp",
    "schema_version",
)
_ENVELOPE_FIELD_SET = frozenset(ENVELOPE_FIELDS)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# an escaped NUL that is not itself an escaped backslash followed by "u0000"
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
MAX_AGGREGATE_ID_LENGTH = 256
MAX_TIMESTAMP_MS = 253402300799999  # 9999-12-31, the last instant PostgreSQL's to_timestamp keeps
MAX_TRACE_ID_LENGTH = 128


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~0.6 µs more per event to build
class Event:
    """The typed fields of a valid envelope, as they go into raw.order_events."""

    event_id: str
    aggregate_id: str
    event_type: str
    schema_version: int
    timestamp_ms: int
    payload_json: str
    trace_id: str | None


def parse_event(value: bytes | None, *, max_bytes: int) -> Event | Rejection:
    """Validate one record value against the envelope contract (docs/event-contract.md)."""
    if value is None or len(value) == 0:
        return Rejection(Reason.INVALID_JSON, "empty value (tombstone)")
    if len(value) > max_bytes:
        return Rejection(Reason.OVERSIZE, f"{len(value)} bytes exceeds the limit of {max_bytes}")
    event = parse_fast(value)
    return event if event is not None else parse_thorough(value)


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The envelope as the fast path reads it: every field typed, none unknown."""

    event_id: Annotated[str, msgspec.Meta(pattern=r"\A" + _UUID.pattern + r"\Z")]
    aggregate_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_AGGREGATE_ID_LENGTH)]
    event_type: str
    payload: msgspec.Raw
    timestamp: Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP_MS)]
    schema_version: int
    trace_id: Annotated[str, msgspec.Meta(max_length=MAX_TRACE_ID_LENGTH)] | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_RAW_DECODERS = registry.RAW_DECODERS


def parse_fast(value: bytes) -> Event | None:
    """The Event of a plainly valid envelope, or None: then `parse_thorough` decides."""
    try:
        env = _decode_envelope(value)
    except DECODE_FAILED:
        return None
    if env.schema_version not in SUPPORTED_VERSIONS.get(env.event_type, ()):
        return None
    decode_payload = _RAW_DECODERS.get((env.event_type, env.schema_version))
    # the payload decoder has read every byte of it: valid UTF-8, numbers a double holds,
    # written as jsonb keeps them (fastcheck.py)
    if decode_payload is None or not decode_payload(env.payload):
        return None
    payload_json = str(env.payload, "utf-8")
    if "\\u0000" in payload_json or "\x00" in env.aggregate_id:
        return None  # the thorough path tells which, and why
    trace_id = env.trace_id
    if trace_id is not None and "\x00" in trace_id:
        return None
    return Event(
        env.event_id,
        env.aggregate_id,
        env.event_type,
        env.schema_version,
        env.timestamp,
        payload_json,
        trace_id,
    )


def parse_thorough(value: bytes) -> Event | Rejection:
    """Validate a record value of any shape; the words of every rejection come from here."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(Reason.INVALID_JSON, str(exc))
    if type(obj) is not dict:
        return Rejection(Reason.NOT_AN_OBJECT, f"envelope is a JSON {type(obj).__name__}")
    if not obj.keys() >= _ENVELOPE_FIELD_SET:
        missing = [f for f in ENVELOPE_FIELDS if f not in obj]
        return Rejection(Reason.MISSING_FIELD, "missing envelope field(s): " + ", ".join(missing))

    event_id = obj["event_id"]
    if type(event_id) is not str or not _UUID.fullmatch(event_id):
        return Rejection(Reason.INVALID_EVENT_ID, f"event_id is not a UUID: {event_id!r:.80}")
    aggregate_id = obj["aggregate_id"]
    if type(aggregate_id) is not str or not 0 < len(aggregate_id) <= MAX_AGGREGATE_ID_LENGTH:
        return Rejection(
            Reason.INVALID_FIELD, f"aggregate_id must be a non-empty string: {aggregate_id!r:.80}"
        )
    if "\x00" in aggregate_id:
        return Rejection(Reason.UNSTORABLE_VALUE, "aggregate_id contains a NUL character")
    timestamp = obj["timestamp"]
    if type(timestamp) is not int or not 0 <= timestamp <= MAX_TIMESTAMP_MS:
        return Rejection(
            Reason.INVALID_FIELD, f"timestamp must be epoch milliseconds: {timestamp!r:.80}"
        )
    trace_id = obj.get("trace_id")
    if trace_id is not None and (
        type(trace_id) is not str or len(trace_id) > MAX_TRACE_ID_LENGTH or "\x00" in trace_id
    ):
        return Rejection(Reason.INVALID_FIELD, f"trace_id must be a short string: {trace_id!r:.80}")

    event_type = obj["event_type"]
    versions = SUPPORTED_VERSIONS.get(event_type) if type(event_type) is str else None
    if versions is None:
        return Rejection(Reason.UNKNOWN_EVENT_TYPE, f"unknown event_type {event_type!r:.80}")
    version = obj["schema_version"]
    if type(version) is not int or version not in versions:
        return Rejection(
            Reason.UNSUPPORTED_SCHEMA_VERSION,
            f"{event_type} schema_version {version!r:.40} is not one of {sorted(versions)}",
        )
    payload = obj["payload"]
    if type(payload) is not dict:
        return Rejection(
            Reason.PAYLOAD_SCHEMA_VIOLATION,
            f"payload must be an object, got {type(payload).__name__}",
        )
    violation = registry.payload_violation(event_type, version, payload)
    if violation is not None:
        return Rejection(Reason.PAYLOAD_SCHEMA_VIOLATION, violation)

    try:
        payload_json = orjson.dumps(payload).decode()
        if "e+" in payload_json:
            # orjson reads an integer beyond 64 bits as a float of 9.2e18 or more, which it
            # writes with a positive exponent; the standard library keeps such integers exact,
            # so a huge number lands literally (jsonb numeric holds it). A string holding "e+"
            # takes this path too, only slower; hex ids ("4e3f") no longer do.
            exact = json.loads(value)["payload"]
            payload_json = json.dumps(exact, separators=(",", ":"), ensure_ascii=False)
    except (orjson.JSONEncodeError, RecursionError, ValueError) as exc:
        # e.g. nesting deeper than the encoder writes
        return Rejection(Reason.UNSTORABLE_VALUE, f"payload cannot be re-encoded: {exc}")
    if "\\u0000" in payload_json and _JSON_NUL.search(payload_json):
        return Rejection(Reason.UNSTORABLE_VALUE, "payload contains \\u0000, which jsonb rejects")
    return Event(event_id, aggregate_id, event_type, version, timestamp, payload_json, trace_id)


# --- COPY text format -------------------------------------------------------------------------

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
NULL = "\\N"


def copy_text(value: str | None) -> str:
    """A text value escaped for COPY's text format."""
    if value is None:
        return NULL
    # most values need no escaping, and two scans in C find that out faster than a regex
    # search (str.translate costs ~10x either): tab, newline and return are not printable
    if "\\" in value or not value.isprintable():
        return value.translate(_COPY_ESCAPES)
    return value


def copy_json(value: str) -> str:
    """JSON text escaped for COPY's text format. Valid JSON holds no raw control character but
    the whitespace between its tokens, so four substring scans in C tell whether anything needs
    escaping (a pretty-printed payload does; orjson's output only ever has backslashes)."""
    if "\\" in value or "\n" in value or "\t" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def copy_bytea(value: bytes | None) -> str:
    """bytea in COPY text format: hex, with the backslash itself escaped."""
    return NULL if value is None else "\\\\x" + value.hex()
