"""The session settings every orderflow client pins, and the PGOPTIONS that carry them to dbt."""

from __future__ import annotations

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from orderflow_dagster.land import session
from orderflow_dagster.transform.dbt import dbt_session_env


def test_a_session_pins_read_committed_read_write_and_no_timeouts_on_any_server_version():
    old = session.session_settings(read_only=False, server_version=160004)
    new = session.session_settings(read_only=False, server_version=180001)
    assert (
        old["default_transaction_isolation"]
        == new["default_transaction_isolation"]
        == ("read committed")
    )
    assert old["default_transaction_read_only"] == "off"
    assert "transaction_timeout" not in old and new["transaction_timeout"] == "0"
    assert (
        session.session_settings(read_only=True, server_version=180001)[
            "default_transaction_read_only"
        ]
        == "on"
    )


def test_dbt_options_come_after_the_users_and_are_added_once():
    first = dbt_session_env({"PGOPTIONS": "-c search_path=x"})["PGOPTIONS"]
    assert first.startswith("-c search_path=x ")
    assert dbt_session_env({"PGOPTIONS": first})["PGOPTIONS"] == first
    assert dbt_session_env({})["PGOPTIONS"] == session.libpq_options(session.TRANSACTION_DEFAULTS)


@settings(max_examples=40, deadline=None)
@given(value=st.text(st.characters(exclude_characters="\x00"), max_size=30))
def test_the_server_reads_every_option_value_back_as_given(stack_dsn, value):
    """Through the real server's parsing of the startup options: a custom setting's value,
    whatever spaces or backslashes it holds, and the pins themselves, the later one winning."""
    options = session.with_options(
        "-c default_transaction_isolation=serializable",
        session.libpq_options({**session.TRANSACTION_DEFAULTS, "orderflow.probe": value}),
    )
    with psycopg.connect(stack_dsn, options=options) as conn:
        got = conn.execute(
            "select current_setting('orderflow.probe'),"
            " current_setting('default_transaction_isolation')"
        ).fetchone()
    assert got == (value, "read committed")
