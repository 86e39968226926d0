"""Tracing through opentelemetry-api: a no-op unless the application configures an SDK.

The W3C trace context crosses Kafka in a `traceparent` record header; landing stores its trace id
in raw.order_events.trace_id (and the audit log), and dbt carries it to
order_status.last_trace_id, so one order can be followed from the producer to the view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry import propagate, trace

tracer = trace.get_tracer("orderflow")

HeaderList = list[tuple[str, str | bytes | None]]


def with_trace_context(
    headers: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None,
) -> HeaderList | None:
    """`headers` plus the current span's `traceparent` (and `tracestate`), if a span is active
    and the caller did not set one."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return None if headers is None else _as_list(headers)
    out = _as_list(headers or [])
    present = {name for name, _ in out}
    out += [(k, v.encode()) for k, v in carrier.items() if k not in present]
    return out


def _as_list(headers) -> HeaderList:
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)
