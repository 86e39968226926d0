"""One publish: record what changed in the history, then publish the changelog's new rows."""

from __future__ import annotations

from dataclasses import dataclass

from orderflow_dagster import settings
from orderflow_dagster.land import session
from orderflow_dagster.publish import changelog
from orderflow_dagster.publish.producer import DEFAULT_BATCH_SIZE, Published, publish

MAX_LAG_ENV = "ORDERFLOW_MAX_PUBLISH_LAG"
DEFAULT_MAX_LAG = 10_000
BATCH_SIZE_ENV = "ORDERFLOW_PUBLISH_BATCH_SIZE"


@dataclass(frozen=True)
class PublishReport:
    recorded: changelog.Recorded
    published: Published
    lag: int  # changelog rows not yet on the topic after this publish

    def metadata(self) -> dict[str, int | float]:
        return {
            "transitions_recorded": self.recorded.transitions,
            "corrections_recorded": self.recorded.corrections,
            "retractions_recorded": self.recorded.retractions,
            "messages_published": self.published.messages,
            "transactions": self.published.transactions,
            "position": self.published.position,
            "lag": self.lag,
            "duration_s": round(self.published.seconds, 3),
        }


def max_lag() -> int:
    return settings.env_int(MAX_LAG_ENV, DEFAULT_MAX_LAG)


def publish_status_changes(
    dsn: str,
    bootstrap: str,
    *,
    topic: str | None = None,
    transactional_id: str | None = None,
    batch_size: int | None = None,
) -> PublishReport:
    batch_size = batch_size or settings.env_int(BATCH_SIZE_ENV, DEFAULT_BATCH_SIZE)
    topic = topic or settings.status_topic()
    transactional_id = transactional_id or settings.publish_transactional_id()
    conn = session.connect(dsn)
    try:
        recorded = changelog.record_changes(conn, settings.analytics_schema())
        published = publish(conn, bootstrap, topic, transactional_id, batch_size=batch_size)
        lag = changelog.unpublished(conn, published.position)
    finally:
        conn.close()
    return PublishReport(recorded, published, lag)
