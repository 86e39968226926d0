"""Dagster concurrency pools: which runs may run at the same time.

Each asset names its pool (`pool=` on `raw_order_events` and on the dbt assets), and the
instance (`deploy/dagster.yaml`, `concurrency: pools: granularity: run`) keeps a queued run
waiting until every pool it needs has a free slot, counting each run in progress once:

- `dbt`: one slot, always. Incremental models must not race, and the dbt sensor's own "no build
  while one runs" rule cannot see a build launched by hand or by a backfill.
- `landing`: `ORDERFLOW_LANDING_POOL_LIMIT` slots (2 by default), so a burst of ranges never takes
  the slot a dbt build needs, and the number of Postgres backends COPYing at once stays bounded.

A pool's limit lives in Dagster's storage, not in dagster.yaml, whose `default_limit: 1` gives
every pool nobody set a single slot. `orderflow serve` sets both at start
(`apply_pool_limits`); a deployment started otherwise sets them once with
`dagster instance concurrency set landing <n>` (and `dbt 1`).
"""

from __future__ import annotations

from collections.abc import Mapping

from dagster import DagsterInstance

from orderflow_dagster import settings

LANDING_POOL = "landing"
DBT_POOL = "dbt"
DEFAULT_LANDING_LIMIT = 2
LANDING_LIMIT_ENV = "ORDERFLOW_LANDING_POOL_LIMIT"


def pool_limits(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The limit of each orderflow pool: dbt 1, landing from the environment."""
    landing = settings.env_int(LANDING_LIMIT_ENV, DEFAULT_LANDING_LIMIT, env)
    if landing < 1:
        raise ValueError(f"{LANDING_LIMIT_ENV} must be at least 1, got {landing}")
    return {DBT_POOL: 1, LANDING_POOL: landing}


def apply_pool_limits(
    instance: DagsterInstance, env: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Set the orderflow pools' limits in the instance's storage; returns them."""
    limits = pool_limits(env)
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)
    return limits
