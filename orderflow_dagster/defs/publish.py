"""The publish asset: order_status_history's changes on the Kafka topic orders.status.

Part of the dbt job (it depends on order_status_history, so it runs after the build in the same
run) and of the `dbt` pool, so no two publishes run at once however they were launched.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    asset,
)

from orderflow_dagster import settings
from orderflow_dagster.defs.resources import KafkaResource, PostgresResource
from orderflow_dagster.pools import DBT_POOL
from orderflow_dagster.publish.run import MAX_LAG_ENV, max_lag, publish_status_changes

# the dbt model's key, as OrderflowDbtTranslator names models
ORDER_STATUS_HISTORY_KEY = AssetKey(["order_status_history"])
PUBLISH_LAG_CHECK = "publish_lag"


def lag_check(lag: int, threshold: int) -> AssetCheckResult:
    """Fails (severity ERROR) when more status changes than `threshold` wait to be published."""
    return AssetCheckResult(
        check_name=PUBLISH_LAG_CHECK,
        passed=lag <= threshold,
        severity=AssetCheckSeverity.ERROR,
        description=f"{lag} status changes not published (threshold {threshold})",
        metadata={"lag": lag, "threshold": threshold},
    )


@asset(
    name="orders_status_topic",
    deps=[ORDER_STATUS_HISTORY_KEY],
    group_name="publish",
    pool=DBT_POOL,
    kinds={"kafka", "postgres"},
    check_specs=[
        AssetCheckSpec(
            PUBLISH_LAG_CHECK,
            asset="orders_status_topic",
            description=f"status changes not yet on the topic, against {MAX_LAG_ENV}",
        )
    ],
    description="order_status_history's transitions (and corrections) published exactly once "
    "to the Kafka topic orders.status by a transactional producer.",
)
def orders_status_topic(
    context: AssetExecutionContext, kafka: KafkaResource, postgres: PostgresResource
) -> MaterializeResult:
    report = publish_status_changes(postgres.dsn, kafka.bootstrap_servers)
    threshold = max_lag()
    context.log.info(
        f"published {report.published.messages} messages to {settings.status_topic()}, "
        f"lag {report.lag}"
    )
    return MaterializeResult(
        metadata=report.metadata(),
        check_results=[lag_check(report.lag, threshold)],
    )
