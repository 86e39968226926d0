"""Settings read from the environment, in one place.

Everything orderflow needs to reach its services comes from environment variables so that secrets
never live in code, config files or Dagster run config. `orderflow stack up` prints the two that
matter (`ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS`, `ORDERFLOW_POSTGRES_DSN`); a user with their own
cluster sets them instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TOPIC = "orders.events"
DEFAULT_DLQ_TOPIC = "orders.dlq"
DEFAULT_CONSUMER_GROUP = "orderflow"
DEFAULT_STATUS_TOPIC = "orders.status"
DEFAULT_PUBLISH_TRANSACTIONAL_ID = "orderflow-status-publisher"
DEFAULT_KAFKA_PORT = 9092
# 5432 is usually taken by a system Postgres; this one is ours.
DEFAULT_POSTGRES_PORT = 15432
# Dagster's own storage (runs, event logs, ticks): a database of its own beside the pipeline's
DEFAULT_DAGSTER_DATABASE = "dagster"

# librdkafka properties pass through as ORDERFLOW_KAFKA_CONFIG_<NAME>, '_' standing for '.', so
# ORDERFLOW_KAFKA_CONFIG_SASL_MECHANISMS=PLAIN becomes sasl.mechanisms=PLAIN.
KAFKA_PASSTHROUGH_PREFIX = "ORDERFLOW_KAFKA_CONFIG_"


def repo_root() -> Path | None:
    """The checkout this package runs from, if it runs from one (editable install)."""
    candidate = Path(__file__).resolve().parents[1]
    return candidate if (candidate / "pyproject.toml").exists() else None


def orderflow_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("ORDERFLOW_HOME"):
        return Path(env["ORDERFLOW_HOME"]).expanduser().resolve()
    root = repo_root()
    return (root if root is not None else Path.cwd()) / ".orderflow"


def kafka_passthrough(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka client properties given in the environment (SASL/SSL and the like)."""
    env = os.environ if env is None else env
    return {
        name[len(KAFKA_PASSTHROUGH_PREFIX) :].lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(KAFKA_PASSTHROUGH_PREFIX) and len(name) > len(KAFKA_PASSTHROUGH_PREFIX)
    }


def env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def topic(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_TOPIC") or DEFAULT_TOPIC


def dlq_topic(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_DLQ_TOPIC") or DEFAULT_DLQ_TOPIC


def status_topic(env: Mapping[str, str] | None = None) -> str:
    """The topic order status transitions are published to."""
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_STATUS_TOPIC") or DEFAULT_STATUS_TOPIC


def publish_transactional_id(env: Mapping[str, str] | None = None) -> str:
    """The publisher's transactional.id: one per deployment, so a second publisher fences the
    first instead of writing beside it."""
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_PUBLISH_TRANSACTIONAL_ID") or DEFAULT_PUBLISH_TRANSACTIONAL_ID


def analytics_schema(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_ANALYTICS_SCHEMA") or "analytics"


def consumer_group(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_CONSUMER_GROUP") or DEFAULT_CONSUMER_GROUP


def require(name: str, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    value = env.get(name)
    if not value:
        raise RuntimeError(
            f'{name} is not set. Run `eval "$(orderflow stack up)"` for the local stack, '
            f"or export it to point at your own service."
        )
    return value


# what replaces a password, whatever its length
MASK = "***"
_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# password=, sslpassword=, PGPASSWORD= ...: anything ending in "password", in any case
_SECRET_KEYWORD = re.compile(r"(?<![\w.-])[\w.-]*password\s*=\s*", re.IGNORECASE)
_NEXT_KEYWORD = re.compile(r"\s+[A-Za-z_][\w.-]*\s*=")


def redact_dsn(text: str) -> str:
    """A DSN, or text holding DSNs (an error message, say), safe to print: every password
    replaced by `***`, whatever it holds.

    - A whole key=value DSN is parsed as libpq parses it (`psycopg.conninfo`: quoted values,
      backslash escapes, several hosts) and written out again with the secrets masked.
    - A URL (`postgresql://user:password@host1,host2/db?sslpassword=...`) loses the password of
      its user info and every query parameter whose %-decoded name ends in "password". Where a
      URL is sloppy (an unencoded `@` or `/` in the password), everything between the user's
      `:` and the last `@` goes, so nothing of the password can remain.
    - In other text, a URL ends at whitespace, and `...password=value` loses the value, quoted
      or not; an unquoted value that a space ends too early for libpq runs, here, to the next
      `name=` or the end, so no part of a password given unquoted survives either.
    """
    stripped = text.strip()
    if _URL.match(stripped) and not any(c.isspace() for c in stripped):
        return _mask(stripped, _url_secrets(stripped, 0, len(stripped)))
    whole = _redact_conninfo(stripped)
    return whole if whole is not None else _redact_text(text)


def _redact_conninfo(dsn: str) -> str | None:
    """The key=value DSN with its secrets masked; None if `dsn` is not one or holds none."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if "=" not in dsn:
        return None
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # not a DSN libpq accepts: treat it as text
        return None
    secrets = [name for name in params if name.lower().endswith("password")]
    if not secrets:
        return None
    masked = {**params, **dict.fromkeys(secrets, MASK)}
    # the DSN as written, when masking it in place gives what libpq reads with the secrets
    # masked; libpq's reading written out otherwise
    in_place = _redact_text(dsn)
    try:
        if conninfo_to_dict(in_place) == masked:
            return in_place
    except Exception:  # masking broke the quoting: write it out instead
        pass
    return make_conninfo("", **masked)


def _url_secrets(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of text[start:end], a postgres URL, that may hold a password."""
    from urllib.parse import unquote

    spans = []
    authority = _URL.match(text, start).end()
    colon = text.find(":", authority, end)
    # libpq ends the user info at the first "@" before any "/"; a sloppy URL may have more
    first_at = text.find("@", authority, end)
    slash = text.find("/", authority, end)
    libpq_info_end = first_at if first_at != -1 and (slash == -1 or first_at < slash) else -1
    last_at = text.rfind("@", authority, end)
    if colon != -1 and last_at != -1 and colon < last_at:
        spans.append((colon + 1, last_at))
    query = text.find("?", libpq_info_end + 1 if libpq_info_end != -1 else authority, end)
    if query != -1:
        position = query + 1
        while position <= end:
            amp = text.find("&", position, end)
            stop = end if amp == -1 else amp
            name, equals, _ = text[position:stop].partition("=")
            if equals and unquote(name).lower().endswith("password"):
                spans.append((position + len(name) + 1, stop))
            position = stop + 1
    return spans


def _redact_text(text: str) -> str:
    spans: list[tuple[int, int]] = []
    urls = []
    for match in _URL.finditer(text):
        end = match.start()
        while end < len(text) and not text[end].isspace():
            end += 1
        urls.append((match.start(), end))
        spans += _url_secrets(text, match.start(), end)
    for match in _SECRET_KEYWORD.finditer(text):
        if any(s <= match.start() < e for s, e in urls):
            continue  # a URL's query parameter, handled above
        spans.append((match.end(), _value_end(text, match.end())))
    return _mask(text, spans)


def _value_end(text: str, start: int) -> int:
    """Where the conninfo value starting at `start` ends (see redact_dsn for unquoted ones)."""
    position = start
    if text.startswith("'", position):
        position += 1
        while position < len(text) and text[position] != "'":
            position += 2 if text[position] == "\\" else 1
        return min(position + 1, len(text))
    while position < len(text):
        if text[position] == "\\":
            position += 2
        elif text[position].isspace():
            if _NEXT_KEYWORD.match(text, position) or not text[position:].strip():
                return position
            position += 1
        else:
            position += 1
    return len(text)


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out, done = [], 0
    for start, end in merged:
        out += [text[done:start], MASK]
        done = end
    out.append(text[done:])
    return "".join(out)
