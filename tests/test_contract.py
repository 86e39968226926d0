"""The schema registry and the upcasters: pure unit tests."""

import pytest

from orderflow_dagster.contract import registry
from orderflow_dagster.contract.upcast import UPCASTERS, order_created_v1_to_v2, upcast


def test_every_event_type_of_the_contract_has_a_schema_for_each_version_up_to_the_latest():
    assert set(registry.EVENT_TYPES) == {
        "OrderCreated",
        "PaymentProcessed",
        "ItemShipped",
        "OrderDelivered",
        "OrderCancelled",
    }
    for event_type, latest in registry.LATEST_VERSION.items():
        assert registry.SUPPORTED_VERSIONS[event_type] == frozenset(range(1, latest + 1))


def test_every_version_step_has_an_upcaster():
    for event_type, latest in registry.LATEST_VERSION.items():
        for version in range(1, latest):
            assert (event_type, version) in UPCASTERS


def test_order_created_v1_upcasts_to_v2_with_the_web_channel():
    v1 = {"customer_id": "c", "order_total": 1, "currency": "EUR", "items": []}
    assert upcast("OrderCreated", 1, v1) == (2, {**v1, "channel": "web"})
    assert registry.payload_violation("OrderCreated", 2, order_created_v1_to_v2(v1)) is None


def test_upcasting_keeps_unknown_fields_and_a_v2_channel():
    v2 = {
        "customer_id": "c",
        "order_total": 1,
        "currency": "EUR",
        "items": [],
        "channel": "store",
        "loyalty_tier": "gold",
    }
    assert upcast("OrderCreated", 2, v2) == (2, v2)
    assert order_created_v1_to_v2({"x": 1})["x"] == 1


def test_a_payload_at_the_latest_version_is_returned_unchanged():
    payload = {"reason": "changed my mind"}
    assert upcast("OrderCancelled", 1, payload) == (1, payload)


@pytest.mark.parametrize(
    ("event_type", "payload", "fragment"),
    [
        (
            "OrderCreated",
            {"customer_id": "c", "order_total": "1", "currency": "EUR", "items": []},
            "order_total must be number",
        ),
        (
            "OrderCreated",
            {
                "customer_id": "c",
                "order_total": 1,
                "currency": "EUR",
                "items": [{"sku": "S", "qty": 0, "unit_price": 1}],
            },
            "qty",
        ),
        (
            "PaymentProcessed",
            {"payment_id": "p", "amount": 1, "currency": "euro", "method": "card"},
            "currency",
        ),
        ("OrderDelivered", {}, "signed_by"),
    ],
)
def test_schema_violations_name_the_offending_field(event_type, payload, fragment):
    violation = registry.payload_violation(event_type, 1, payload)
    assert violation is not None and fragment in violation


def test_unknown_payload_fields_are_allowed():
    assert (
        registry.payload_violation("OrderDelivered", 1, {"signed_by": None, "photo": "x"}) is None
    )
