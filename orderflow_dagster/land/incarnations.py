"""Topic incarnations: telling a deleted and re-created Kafka topic from the one the ledger holds.

Kafka names a topic, but offsets belong to one incarnation of it: a topic deleted and created
again restarts at offset 0 under a new topic id, and a ledger that only knew the name would take
the new log's offsets for the old one's. So every incarnation orderflow sees is registered in
raw.topic_incarnations, with Kafka's topic id and the stream its rows are stored under (the
bare topic for the first one, `<topic>@<topic id>` after that: see ranges.INCARNATION_SEPARATOR),
and the plan and the ledger record the topic id of every range.

The rules the planner, the landing, the commit repair and verify share:
- a topic's current stream is the latest registered one with Kafka's current topic id; every
  other stream of the topic is retired: its ranges are never landed, its commits never repaired;
- a topic id seen for the first time is registered as a new stream, planned from its low
  watermark, so the new incarnation lands whole, under coordinates of its own;
- the offsets a retired stream planned or saw in Kafka and never landed went with the old topic:
  they are reported as lost until a ledger row covers them (an acknowledged loss);
- a log that ends below what the current stream planned or landed (a truncated log, a restored
  cluster, a topic re-created before its id was recorded) is never planned around or committed
  past: LogBehindLedgerError, until an operator starts a new stream (`catch-up --new-stream`).

The pure parts live here; the SQL is in store.py, the Kafka calls in kafka_source.py.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orderflow_dagster.land.ranges import (
    INCARNATION_SEPARATOR,
    OffsetRange,
    kafka_topic,
    uncovered,
)

RUNBOOK = 'docs/operations.md, "Re-created topics"'
# what a broker without topic ids (before Kafka 2.8) reports
ZERO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"
_MASK64 = (1 << 64) - 1


def format_topic_id(most_significant: int, least_significant: int) -> str:
    """A topic id as Kafka itself prints it (`kafka-topics.sh --describe`): the 16 bytes in
    URL-safe base64 without padding. librdkafka's own rendering uses the other alphabet, which
    an operator comparing ids would not recognise."""
    value = ((most_significant & _MASK64) << 64) | (least_significant & _MASK64)
    return base64.urlsafe_b64encode(value.to_bytes(16, "big")).rstrip(b"=").decode()


def stream_name(topic: str, topic_id: str, taken: Iterable[str]) -> str:
    """The stream for a new incarnation of `topic`: `<topic>@<topic id>`, numbered on when an
    operator already started a stream of that same incarnation."""
    if INCARNATION_SEPARATOR in topic:
        raise ValueError(f"not a Kafka topic name: {topic!r}")
    taken = set(taken)
    name = f"{topic}{INCARNATION_SEPARATOR}{topic_id}"
    n = 1
    while name in taken:
        n += 1
        name = f"{topic}{INCARNATION_SEPARATOR}{topic_id}.{n}"
    return name


@dataclass(frozen=True)
class Incarnation:
    """One registered incarnation of a Kafka topic, as raw.topic_incarnations holds it."""

    stream: str
    topic_id: str
    # per partition, the greatest log end planning saw while it was current
    high_watermarks: dict[int, int] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return kafka_topic(self.stream)


def current(incarnations: Sequence[Incarnation], topic_id: str) -> Incarnation | None:
    """The stream that lands Kafka's incarnation `topic_id` now: the latest registered with it
    (`incarnations` oldest first), or None when that incarnation was never registered."""
    matching = [i for i in incarnations if i.topic_id == topic_id]
    return matching[-1] if matching else None


@dataclass(frozen=True)
class Behind:
    """One partition whose log cannot continue the ledger: it ends below it, or is gone."""

    partition: int
    log_end: int | None  # None: Kafka has no such partition
    reached: int  # the end of what was planned or landed there

    def __str__(self) -> str:
        if self.log_end is None:
            return f"partition {self.partition} is not in Kafka (the ledger reaches {self.reached})"
        return (
            f"partition {self.partition}: the log ends at {self.log_end}, "
            f"the ledger reaches {self.reached}"
        )


def log_behind(frontiers: dict[int, int | None], log_ends: dict[int, int]) -> list[Behind]:
    """The partitions whose planned or landed frontier lies past Kafka's log end. Pure."""
    out = []
    for p, reached in sorted(frontiers.items()):
        if reached is None:
            continue
        end = log_ends.get(p)
        if end is None or reached > end:
            out.append(Behind(p, end, reached))
    return out


def lost_spans(
    stream: str,
    planned: dict[int, list[OffsetRange]],
    landed: dict[int, list[tuple[int, int]]],
    seen: dict[int, int],
) -> list[OffsetRange]:
    """Of a retired stream: the offsets from where its first range started up to the furthest
    it planned or saw in Kafka, not covered by its ledger. Pure.

    Those records went with the old incarnation: no range can land them any more, and only an
    acknowledgement (a ledger row covering them) makes them stop counting as lost. Offsets
    produced after planning last looked at the old topic cannot be counted at all."""
    out = []
    for p in sorted(set(planned) | set(landed)):
        starts = [r.start for r in planned.get(p, [])] + [s for s, _ in landed.get(p, [])]
        ends = [r.end for r in planned.get(p, [])] + [e for _, e in landed.get(p, [])]
        end = max([*ends, seen.get(p, 0)])
        out += [
            OffsetRange(stream, p, s, e) for s, e in uncovered(min(starts), end, landed.get(p, []))
        ]
    return out


def describe_ranges(ranges: Sequence[OffsetRange], limit: int = 5) -> str:
    text = ", ".join(str(r) for r in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


class IncarnationError(Exception):
    """Kafka's log of a topic and the ledger do not describe the same log. Not transient: the
    pipeline stops on that topic and says what to do; retrying would change nothing."""


_LOST_HINT = (
    "The old stream's unlanded offsets count as lost until acknowledged: re-produce them if "
    f"their source still has them, then run `orderflow ack-loss` (see {RUNBOOK})."
)


class StreamRetiredError(IncarnationError):
    """A range of a stream that no longer lands its topic: an operator started a new stream of
    the same incarnation (`orderflow catch-up --new-stream`)."""

    def __init__(self, what: str, stream: str, successor: str | None) -> None:
        self.stream, self.successor = stream, successor
        super().__init__(self._message(what))

    def _message(self, what: str) -> str:
        return (
            f"{what} belongs to stream {self.stream}, which was retired by "
            f"`orderflow catch-up --new-stream`: Kafka's log of {kafka_topic(self.stream)} is "
            f"landed as stream {self.successor} now. orderflow refuses to land it. {_LOST_HINT}"
        )


class TopicRecreatedError(StreamRetiredError):
    """A range of an incarnation of the topic that Kafka no longer has."""

    def __init__(
        self, what: str, stream: str, recorded_id: str, kafka_id: str, successor: str | None
    ) -> None:
        self.recorded_id, self.kafka_id = recorded_id, kafka_id
        super().__init__(what, stream, successor)

    def _message(self, what: str) -> str:
        landed_as = f"as stream {self.successor}" if self.successor else "as a stream of its own"
        return (
            f"{what} was planned on incarnation {self.recorded_id} of Kafka topic "
            f"{kafka_topic(self.stream)}, but the topic now has id {self.kafka_id}: it was "
            "deleted and re-created, and the old incarnation's records went with it. orderflow "
            f"will not land it; it lands the new topic from its first offset {landed_as}. "
            f"{_LOST_HINT}"
        )


class LogBehindLedgerError(IncarnationError):
    """Kafka's log of the current incarnation ends below what orderflow planned or landed."""

    def __init__(self, stream: str, topic_id: str, behind: Sequence[Behind]) -> None:
        self.stream, self.topic_id, self.behind = stream, topic_id, list(behind)
        topic = kafka_topic(stream)
        super().__init__(
            f"Kafka's log of {topic} (topic id {topic_id}) ends below the ledger of stream "
            f"{stream}: {'; '.join(str(b) for b in behind)}. New records would reuse those "
            f"offsets and be skipped, so orderflow plans and commits nothing on {topic}. "
            "Causes: a truncated log (unclean leader election), a cluster restored from an "
            "older state, or a topic re-created before orderflow recorded topic ids. Restore "
            "the log if you can; otherwise run `orderflow catch-up --new-stream` to land Kafka's "
            "log from its first offset as a new stream (events landed before count as "
            "duplicates; the marts keep one copy), then acknowledge what the old stream never "
            f"landed with `orderflow ack-loss`. See {RUNBOOK}."
        )


def refuse_retired(what: str, stream: str, known: Sequence[Incarnation], kafka_id: str) -> None:
    """Raise unless `stream` lands Kafka's current incarnation `kafka_id` of its topic (`known`:
    the topic's registered incarnations, oldest first). Pure."""
    now = current(known, kafka_id)
    if now is not None and now.stream == stream:
        return
    mine = next((i for i in known if i.stream == stream), None)
    if mine is None:
        raise IncarnationError(
            f"{what}: stream {stream} is not registered in raw.topic_incarnations, so orderflow "
            f"cannot tell which incarnation of Kafka topic {kafka_topic(stream)} it was planned "
            "on; it refuses to land it"
        )
    successor = None if now is None else now.stream
    if mine.topic_id != kafka_id:
        raise TopicRecreatedError(what, stream, mine.topic_id, kafka_id, successor)
    raise StreamRetiredError(what, stream, successor)
