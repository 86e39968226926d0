"""The one way orderflow opens a Postgres session: with what its transactions need pinned.

The exactly-once argument of the landing (and of planning, replay and the commit repair) is
"take an advisory lock, then read what the previous holder committed". That holds only in READ
COMMITTED, where each statement reads a fresh snapshot; under REPEATABLE READ or SERIALIZABLE
the snapshot is taken by the lock statement, before the wait, and the reads after it miss what
the previous holder committed. A DBA can make either the database's or the role's default
(`alter database ... set default_transaction_isolation = 'repeatable read'`), so the session
never relies on defaults it does not set:

- every `conn.transaction()` BEGINs with an explicit ISOLATION LEVEL READ COMMITTED and READ
  WRITE (READ ONLY for verify), and the session defaults say the same for autocommit statements;
- `default_transaction_deferrable` is left alone: it only affects SERIALIZABLE READ ONLY
  transactions, which orderflow never runs;
- statement_timeout, lock_timeout, idle_in_transaction_session_timeout and transaction_timeout
  are turned off. The landing waits by design (for another landing of its partition, for the
  settle of other partitions, for Kafka between statements of its transaction while it commits
  offsets) and streams a whole range through one COPY. A timeout there rolls the landing back,
  which loses nothing, but the range then fails the same way on every retry and the partition
  stalls. The landing bounds itself instead: Kafka reads give up after an idle timeout, and a
  range holds at most ORDERFLOW_MAX_EVENTS_PER_BATCH offsets.

dbt's sessions take the isolation and read-write settings through PGOPTIONS (dbt-postgres has
no profile field for session settings); see `libpq_options` and transform/dbt.py.
"""

from __future__ import annotations

import psycopg
from psycopg import IsolationLevel

# the transaction defaults every orderflow session pins, dbt's included
TRANSACTION_DEFAULTS = {
    "default_transaction_isolation": "read committed",
    "default_transaction_read_only": "off",
}
TIMEOUTS_OFF = {
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
}
# PostgreSQL 17 added transaction_timeout; an older server refuses the name
TRANSACTION_TIMEOUT_SINCE = 170000


def session_settings(*, read_only: bool, server_version: int) -> dict[str, str]:
    """The settings a session of orderflow pins (pure)."""
    settings = {
        **TRANSACTION_DEFAULTS,
        "default_transaction_read_only": "on" if read_only else "off",
        **TIMEOUTS_OFF,
    }
    if server_version >= TRANSACTION_TIMEOUT_SINCE:
        settings["transaction_timeout"] = "0"
    return settings


def connect(
    dsn: str, *, read_only: bool = False, application_name: str = "orderflow"
) -> psycopg.Connection:
    """An autocommit connection whose transactions (`with conn.transaction():`) BEGIN as READ
    COMMITTED, READ WRITE (or READ ONLY), whatever the database's or role's defaults."""
    conn = psycopg.connect(dsn, autocommit=True, application_name=application_name)
    try:
        conn.isolation_level = IsolationLevel.READ_COMMITTED
        conn.read_only = read_only
        settings = session_settings(read_only=read_only, server_version=conn.info.server_version)
        # one round trip; SET is allowed even where the default is a read-only transaction
        conn.execute(
            "select set_config(name, value, false) from unnest(%s::text[], %s::text[])"
            " as s(name, value)",
            (list(settings), list(settings.values())),
        )
    except BaseException:
        conn.close()
        raise
    return conn


# what the server's split of the options string treats specially (pg_split_opts)
_SPLITS_OPTIONS = frozenset(" \t\n\r\f\v\\")


def libpq_options(settings: dict[str, str]) -> str:
    """`-c name=value ...` for libpq's `options` / PGOPTIONS. The server splits them at ASCII
    whitespace, a backslash taking the next character literally."""

    def escape(text: str) -> str:
        return "".join(f"\\{c}" if c in _SPLITS_OPTIONS else c for c in text)

    return " ".join(f"-c {escape(name)}={escape(value)}" for name, value in settings.items())


def with_options(existing: str | None, options: str) -> str:
    """PGOPTIONS with `options` after whatever the user set (the later -c of a name wins)."""
    existing = (existing or "").strip()
    if not existing:
        return options
    if existing.endswith(options):
        return existing
    return f"{existing} {options}"
