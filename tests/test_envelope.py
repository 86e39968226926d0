"""Event ids: RFC 9562 version 7, so ids minted later sort later (index locality downstream)."""

import time
import uuid

import pytest

from orderflow_dagster.ingest.envelope import new_event, new_event_id, uuid7


def test_uuid7_carries_its_millisecond_time_version_and_variant():
    u = uuid7(1_735_689_600_123, (1 << 74) - 1)
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    assert u.int >> 80 == 1_735_689_600_123
    # all 74 random bits land in rand_a and rand_b, none spill into version or variant
    assert uuid7(0, (1 << 74) - 1).int == (0xFFF << 64 | (1 << 62) - 1) | 0x7 << 76 | 0b10 << 62


def test_uuid7_sorts_by_time_whatever_the_random_bits():
    earlier = uuid7(1_000, (1 << 74) - 1)
    later = uuid7(1_001, 0)
    assert str(earlier) < str(later)
    assert earlier.bytes < later.bytes  # Postgres compares uuids bytewise


def test_uuid7_refuses_a_time_beyond_48_bits():
    with pytest.raises(ValueError, match="48 bits"):
        uuid7(1 << 48, 0)
    with pytest.raises(ValueError, match="48 bits"):
        uuid7(-1, 0)


def test_fresh_event_ids_are_uuidv7_of_now_and_distinct():
    before = int(time.time() * 1000)
    ids = [uuid.UUID(new_event_id()) for _ in range(1000)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == 1000
    assert all(i.version == 7 and before <= i.int >> 80 <= after for i in ids)


def test_an_event_gets_a_fresh_uuidv7_unless_the_caller_passes_its_id():
    fresh = new_event("ord-1", "OrderCancelled", {"reason": "r"})
    assert uuid.UUID(fresh["event_id"]).version == 7
    retry = new_event("ord-1", "OrderCancelled", {"reason": "r"}, event_id=fresh["event_id"])
    assert retry["event_id"] == fresh["event_id"]
