"""`redact_dsn` never prints any part of a password, whatever the password and however the DSN
writes it: key=value (quoted, backslash-escaped, by psycopg), URL (user info, query parameters,
%-encoded, several hosts, sloppy), alone or inside an error message."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orderflow_dagster.settings import MASK, redact_dsn

# anything a DSN can carry: no NUL, no lone surrogate (neither can be encoded for libpq)
PASSWORDS = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
)
# characters a URL's user info may hold unencoded, for libpq (which ends it at "@" or "/")
USERINFO_SAFE = ["", "!$&'()*+,;=:", "!$&'()*+,;=:?#[]~"]
# unencoded "@" and "/": not a URL libpq reads as meant, but nothing of it may leak either
SLOPPY_SAFE = ["@/", "@/!$&'()*+,;=:?#"]
QUERY_SAFE = ["", "!$'()*+,;:@/?#"]  # no "&" or "=", which end a query value for libpq


def kv_quoted(key: str, before: str, after: str) -> Callable[[str], str]:
    def build(password: str) -> str:
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        return f"host=db.example {key}{before}={after}'{escaped}' user=orderflow dbname=orders"

    return build


def kv_unquoted(password: str) -> str:
    escaped = "".join(f"\\{c}" if c.isspace() or c in "'\\" else c for c in password)
    return f"host=db1.example,db2.example port=5432,5433 password={escaped} user=orderflow"


def kv_psycopg(password: str) -> str:
    return make_conninfo(
        "host=db.example user=orderflow dbname=orders", password=password, sslmode="require"
    )


def url_userinfo(safe: str) -> Callable[[str], str]:
    def build(password: str) -> str:
        return (
            f"postgresql://orderflow:{quote(password, safe=safe)}@db1.example:5432,"
            "db2.example:5433/orders?sslmode=require&application_name=orderflow"
        )

    return build


def url_query(key: str, safe: str) -> Callable[[str], str]:
    def build(password: str) -> str:
        return (
            f"postgres://orderflow@db.example/orders?sslmode=require&{key}="
            f"{quote(password, safe=safe)}&application_name=orderflow"
        )

    return build


def in_message(build: Callable[[str], str]) -> Callable[[str], str]:
    return lambda password: f"could not connect to {build(password)}: connection refused"


EXACT = [
    *(kv_quoted(k, b, a) for k in ("password", "sslpassword") for b, a in (("", ""), (" ", "  "))),
    kv_psycopg,
    *(url_userinfo(safe) for safe in USERINFO_SAFE),
    *(url_query(k, safe) for k in ("password", "sslpassword", "pass%77ord") for safe in QUERY_SAFE),
]
FORMS = st.sampled_from(EXACT + [in_message(build) for build in EXACT])
SLOPPY = st.sampled_from([url_userinfo(s) for s in SLOPPY_SAFE] + [kv_unquoted])


def fragments(secret: str, size: int = 3) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def written_form(build: Callable[[str], str], password: str) -> str:
    """The password as the DSN writes it (quoted, escaped or %-encoded): where the DSN differs
    from the same DSN with an empty password."""
    dsn, empty = build(password), build("")
    head = common_prefix(dsn, empty)
    tail = common_prefix(dsn[head:][::-1], empty[head:][::-1])
    return dsn[head : len(dsn) - tail]


def common_prefix(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def leaked(build: Callable[[str], str], password: str) -> tuple[str, list[str]]:
    """The redacted DSN, and the fragments of the password (as given, and as the DSN writes
    it) found in it that the same DSN with another password does not show as well."""
    dsn = build(password)
    out = redact_dsn(dsn)
    other = redact_dsn(build("pw"))
    suspects = fragments(password) | fragments(written_form(build, password))
    return out, sorted(f for f in suspects if f in out and f not in other)


@settings(max_examples=400, deadline=None)
@given(build=FORMS, password=PASSWORDS)
@example(build=kv_quoted("password", "", ""), password="my secret pass")
@example(build=url_userinfo(""), password="p@ss/w:rd%20")
def test_no_fragment_of_a_password_survives_and_the_output_does_not_depend_on_it(build, password):
    out, found = leaked(build, password)
    assert found == [], (build(password), out)
    # stronger: what is printed is the same whatever the password
    assert out == redact_dsn(build("pw")), (build(password), out)
    assert MASK in out


@settings(max_examples=300, deadline=None)
@given(build=SLOPPY, password=PASSWORDS.filter(bool))
@example(build=kv_unquoted, password="my secret pass")
def test_a_sloppy_dsn_loses_more_than_its_password_but_never_any_of_it(build, password):
    out, found = leaked(build, password)
    assert found == [], (build(password), out)


def test_a_password_written_unquoted_with_spaces_is_hidden_whole():
    # not a DSN libpq accepts (it stops the value at the first space), but what was meant
    assert redact_dsn("host=h password=my secret pass user=u") == "host=h password=*** user=u"


def test_a_redacted_key_value_dsn_keeps_its_form_and_everything_but_the_password():
    dsn = "host=h1,h2 port=5432,5433 user=orderflow password='my secret pass' dbname=orders"
    out = redact_dsn(dsn)
    assert out == "host=h1,h2 port=5432,5433 user=orderflow password=*** dbname=orders"
    assert conninfo_to_dict(out) == {**conninfo_to_dict(dsn), "password": MASK}


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_text_without_a_secret_is_printed_unchanged(text):
    if "password" in text.lower() or "postgres" in text.lower():
        return
    assert redact_dsn(text) == text
