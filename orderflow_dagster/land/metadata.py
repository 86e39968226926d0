"""A Kafka record's metadata (headers, key, trace context) as stored beside its event or dead
letter: losslessly, and never a reason for a batch to fail. Pure, on the landing's hot path.

Headers are stored as a JSON array of `[name, value]` pairs in the order the record carries
them (Kafka allows a name more than once). A name or value is a JSON string when it is UTF-8
without NUL (the text columns and jsonb cannot hold NUL), else `{"base64": "..."}` of its
bytes; a value may be null. The three shapes are distinct JSON types, so nothing is ambiguous.

A key is stored as text when it is UTF-8 without NUL; otherwise its exact bytes go to a bytea
column beside a readable rendering, so the usual key (the order id) costs nothing extra.

The trace id is taken only from a well-formed W3C traceparent; one that is present but cannot
be used is dropped, with a note saying why (it ends up in the audit row).
"""

from __future__ import annotations

import base64
import operator
import re
from collections.abc import Sequence

import orjson

Headers = Sequence[tuple[str, bytes | None]]

# confluent-kafka (2.16) decodes header names as UTF-8 and, when one is not, returns the list
# anyway with a hole where that name should be and the error left pending. Called directly from
# Python bytecode (once the interpreter has specialized the call) that list comes back as if all
# were well, and reading it crashes the process. Called from C, as `methodcaller` does, the
# interpreter checks the result and raises SystemError instead. The client has then discarded
# the headers, so the landing keeps the event, says so in its note, and stores no headers.
read_headers = operator.methodcaller("headers")
UNREADABLE_HEADERS = (UnicodeError, SystemError)
HEADERS_UNREADABLE = (
    "headers dropped: a header name is not UTF-8, which the Kafka client cannot read"
)

TRACEPARENT = "traceparent"
DROPPED = "traceparent dropped: "


# --- headers ----------------------------------------------------------------------------------


def headers_json(headers: Headers) -> str:
    """The stored (JSON) form of a record's headers; see the module docstring."""
    try:
        # the usual headers are all UTF-8: one pass in C, and only a NUL needs a second look
        text = orjson.dumps([(k, None if v is None else v.decode()) for k, v in headers])
    except (UnicodeError, orjson.JSONEncodeError):  # invalid UTF-8, a lone surrogate
        return _headers_json_exactly(headers)
    # also true of an escaped backslash before "u0000", which the exact path then handles
    if b"\\u0000" in text:
        return _headers_json_exactly(headers)
    return text.decode()


def _headers_json_exactly(headers: Headers) -> str:
    return orjson.dumps(
        [(_name_item(k), None if v is None else _bytes_item(v)) for k, v in headers]
    ).decode()


def _name_item(name: str) -> str | dict[str, str]:
    if "\x00" not in name:
        try:
            name.encode()
            return name
        except UnicodeError:
            pass
    return _base64(name.encode("utf-8", "surrogatepass"))


def _bytes_item(raw: bytes) -> str | dict[str, str]:
    try:
        text = raw.decode()
    except UnicodeError:
        return _base64(raw)
    return text if "\x00" not in text else _base64(raw)


def _base64(raw: bytes) -> dict[str, str]:
    return {"base64": base64.b64encode(raw).decode("ascii")}


def decode_headers(stored: list | dict | None) -> list[tuple[str, bytes | None]]:
    """The headers a stored form came from (the inverse of `headers_json`, as parsed JSON).
    An object is the older form, one lossy text value per name: read as it was written."""
    if stored is None:
        return []
    if isinstance(stored, dict):
        return [(k, None if v is None else str(v).encode()) for k, v in stored.items()]
    return [(_unname(k), None if v is None else _unbytes(v)) for k, v in stored]


def _unname(item: str | dict) -> str:
    if isinstance(item, str):
        return item
    return base64.b64decode(item["base64"], validate=True).decode("utf-8", "surrogatepass")


def _unbytes(item: str | dict) -> bytes:
    if isinstance(item, str):
        return item.encode()
    return base64.b64decode(item["base64"], validate=True)


# --- key --------------------------------------------------------------------------------------


def split_key(key: bytes) -> tuple[str, bytes | None]:
    """(text for the `key` column, exact bytes for `key_bytes` or None when the text is them)."""
    try:
        text = key.decode()
    except UnicodeError:
        return readable(key), key
    return (text, None) if "\x00" not in text else (readable(key), key)


def join_key(text: str | None, raw: bytes | None) -> bytes | None:
    """The key bytes of a stored (key, key_bytes) pair: the inverse of `split_key`."""
    if raw is not None:
        return raw
    return None if text is None else text.encode()


def readable(raw: bytes) -> str:
    """A text rendering of any bytes for people: invalid UTF-8 as \\xNN, NUL as \\x00. Not
    reversible (the text `\\xff` and the byte 0xff look the same): never the only copy."""
    return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


# --- trace context ----------------------------------------------------------------------------

# W3C Trace Context (level 1), traceparent: version-traceid-parentid-flags, lowercase hex
_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_LOWER_HEX = re.compile(rb"[0-9a-f]*")
_ZERO_TRACE_ID = b"0" * 32
_ZERO_PARENT_ID = b"0" * 16


def parse_traceparent(value: bytes | None) -> tuple[str | None, str | None]:
    """(trace id, None) of a well-formed traceparent, else (None, why it is not one)."""
    match = _TRACEPARENT_00.fullmatch(value) if value is not None else None
    if match is not None and match[1] != _ZERO_TRACE_ID and match[2] != _ZERO_PARENT_ID:
        return match[1].decode(), None
    why = _malformed(value)
    return (None, why) if why else (value[3:35].decode(), None)  # type: ignore[index]


def _lower_hex(raw: bytes, size: int) -> bool:
    return len(raw) == size and _LOWER_HEX.fullmatch(raw) is not None


def _malformed(value: bytes | None) -> str | None:
    """Why `value` is not a traceparent a reader of version 00 accepts, or None if it is one.
    A later version keeps the first four fields and may add more after a dash."""
    if value is None:
        return "the header has no value"
    version = value[:2]
    if not _lower_hex(version, 2):
        return "version is not 2 lowercase hex"
    if version == b"ff":
        return "version ff is invalid"
    if version == b"00" and len(value) != 55:
        return "version 00 is not exactly 55 characters"
    if len(value) < 55:
        return "shorter than 55 characters"
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return "fields are not separated by '-'"
    if not _lower_hex(value[3:35], 32):
        return "trace-id is not 32 lowercase hex"
    if value[3:35] == _ZERO_TRACE_ID:
        return "trace-id is all zeros"
    if not _lower_hex(value[36:52], 16):
        return "parent-id is not 16 lowercase hex"
    if value[36:52] == _ZERO_PARENT_ID:
        return "parent-id is all zeros"
    if not _lower_hex(value[53:55], 2):
        return "trace-flags is not 2 lowercase hex"
    if len(value) > 55 and value[55:56] != b"-":
        return "trace-flags is not followed by '-'"
    return None


def trace_from_headers(headers: Headers) -> tuple[str | None, str | None]:
    """(trace id, None) from the record's traceparent header; (None, note) when one is there but
    dropped: malformed, or repeated naming different trace ids; (None, None) when there is none."""
    values = [v for k, v in headers if k == TRACEPARENT]
    if not values:
        return None, None
    if len(values) == 1:
        trace_id, why = parse_traceparent(values[0])
        return (trace_id, None) if why is None else (None, DROPPED + why)
    found = set()
    for n, value in enumerate(values, 1):
        trace_id, why = parse_traceparent(value)
        if why is not None:
            return None, f"{DROPPED}header {n} of {len(values)} named traceparent: {why}"
        found.add(trace_id)
    if len(found) > 1:
        return None, f"{DROPPED}{len(values)} traceparent headers name different trace ids"
    return found.pop(), None
