"""Trace context from a producer's span to the landed row, through the real broker."""

from __future__ import annotations

import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orderflow_dagster.ingest.envelope import new_event
from orderflow_dagster.ingest.producer import EventProducer
from orderflow_dagster.tracing import with_trace_context
from tests.test_landing import connections, land_all

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))


def test_without_an_active_span_no_trace_header_is_added():
    assert with_trace_context(None) is None
    assert with_trace_context({"a": b"1"}) == [("a", b"1")]


def test_a_producer_span_travels_to_the_landed_row_and_both_sides_record_spans(
    kafka_bootstrap, postgres_dsn, topic
):
    tracer = provider.get_tracer("test")
    event = new_event(f"ord-{uuid.uuid4().hex[:6]}", "OrderCancelled", {"reason": "r"})
    # the library's tracer is a proxy that follows the global provider once one is set
    trace.set_tracer_provider(provider)
    with tracer.start_as_current_span("checkout") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        with EventProducer(kafka_bootstrap, topic=topic) as producer:
            producer.emit(event)
    with connections(kafka_bootstrap, postgres_dsn) as (conn, consumer):
        land_all(conn, consumer, topic)
        (landed_trace,) = conn.execute(
            "select trace_id from raw.order_events where event_id = %s", (event["event_id"],)
        ).fetchone()
    assert landed_trace == trace_id
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"checkout", "orderflow.produce", "orderflow.land_range"} <= names
