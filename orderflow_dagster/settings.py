"""Settings read from the environment, in one place.

Everything orderflow needs to reach its services comes from environment variables so that secrets
never live in code, config files or Dagster run config. `orderflow stack up` prints the two that
matter (`ORDERFLOW_KAFKA_BOOTSTRAP_SERVERS`, `ORDERFLOW_POSTGRES_DSN`); a user with their own
cluster sets them instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TOPIC = "orders.events"
DEFAULT_DLQ_TOPIC = "orders.dlq"
DEFAULT_CONSUMER_GROUP = "orderflow"
DEFAULT_KAFKA_PORT = 9092
# 5432 is usually taken by a system Postgres; this one is ours.
DEFAULT_POSTGRES_PORT = 15432

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


def topic(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_TOPIC") or DEFAULT_TOPIC


def dlq_topic(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ORDERFLOW_DLQ_TOPIC") or DEFAULT_DLQ_TOPIC


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


def redact_dsn(dsn: str) -> str:
    """A DSN safe to print: the password, if any, replaced."""
    import re

    dsn = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password=)\S+", r"\1***", dsn)
