"""The common consume in one database round trip (PostgreSQL).

``usage_consume_fast`` (migration ``usage.0006``) does in one statement what
``usage.services.usage_consume`` does when nothing is due on the balance. The Python
path stays the reference: it runs on SQLite, when a lot has to expire or a monthly
period to open (the function says so and rolls back), and when ``USAGE_SQL_FAST_PATH``
is off. ``tests/test_consume_fast_path.py`` holds the two to the same results.

Outside a transaction the statement is its own transaction (autocommit: no BEGIN or
COMMIT round trips); inside one it runs in a savepoint so that a refusal leaves the
caller's transaction usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, connection, transaction

from capacity_portal.postgresql.first_row import UNSUITABLE, first_row
from products.periods import local_date
from teams.models import Team

from .actors import Actor
from .errors import insufficient_balance, key_reused, returnable_not_consumable, unknown_product

FALLBACK = "22X01"  # something is due on the balance: run the Python path
INSUFFICIENT = "22X02"  # the message is the available amount
OVER_LIMIT = "22X03"  # counted last and over the key's rate limit: all rolled back (usage.0010)
# Deployed before its migration ran: no function yet, the Python path still works.
UNDEFINED_FUNCTION = "42883"
UNDEFINED_TABLE = "42P01"  # (the same, for a table: usage_apirate before usage.0009)
# A team time zone this server's time zone data does not know (zoneinfo validated it):
# the Python path computes the day itself.
UNKNOWN_TIME_ZONE = "22023"

SQL = "SELECT * FROM usage_consume_fast(" + ", ".join(["%s"] * 17) + ")"
# The API's consume with its bearer key's lookup, and the key's rate count when asked
# (migrations usage.0007, usage.0009, usage.0010).
KEY_SQL = "SELECT * FROM usage_consume_api(" + ", ".join(["%s"] * 16) + ")"


class Fallback(Exception):  # noqa: N818 - a signal, not an error
    """The fast path does not apply: run the Python path."""


class KeyRejected(Exception):  # noqa: N818 - a signal, not an error
    """No unrevoked API key has this hash (nothing was written but the rate count)."""


class OverLimit(Exception):  # noqa: N818 - a signal, not an error
    """Over the key's rate limit: either counted (committed, ``RateCount.count`` set) and
    refused before anything else, or counted last and rolled back with everything else
    (``RateCount.count`` None: the request is to be counted where it is refused)."""


@dataclass
class RateCount:
    """The request's count against its key's rate limit, made by the consume's statement:
    in the one-minute ``window``, refused over ``limit`` (0: no limit). ``count`` is set
    once the statement has counted and committed (whatever its outcome); it stays None
    when the statement rolled back (raised), so that the request is counted elsewhere."""

    window: int
    limit: int
    count: int | None = None


def enabled() -> bool:
    return connection.vendor == "postgresql" and settings.USAGE_SQL_FAST_PATH


def consume(*, team: Team, product_code: str, unit: str, quantity: int, key: str, fingerprint: str,
            payload: dict, actor: Actor, user: str, service: str, job_id: str, occurred_at: datetime,
            now: datetime, wall: datetime) -> tuple[int, dict, bool, int]:
    """(status, body, replayed, event id) of one consume, or raise a UsageError or Fallback
    (also when the team has no balance row for the product yet).

    ``unit`` words the overdraft message.
    """
    params = [
        team.pk, product_code, quantity, key, fingerprint, json.dumps(payload),
        getattr(actor.api_key, "pk", None), getattr(actor.user, "pk", None), actor.label,
        user, user.lower(), service, job_id, occurred_at, local_date(occurred_at, team.tzinfo), now, wall,
    ]
    row = _execute(SQL, params, product_code=product_code, unit=unit, quantity=quantity)
    return _answer(row, product_code=product_code, quantity=quantity, not_held_is_not_found=False)


def consume_with_key(*, key_hash: str, stale: datetime, product_code: str, quantity: int, key: str,
                     fingerprint: str, payload: dict, user: str, service: str, job_id: str,
                     occurred_at: datetime, now: datetime, wall: datetime,
                     rate: RateCount | None = None) -> tuple[int, dict, bool, int]:
    """:func:`consume` for the API key whose SHA-256 is ``key_hash``, found in the same
    statement (with its team, and its ``last_used_at`` written when older than ``stale``):
    the key is the actor, the day is the team's local day of ``occurred_at``. With
    ``rate``, the statement also counts the request against the key's rate limit (and
    sets ``rate.count``; see :class:`RateCount`).

    Raises :class:`OverLimit` past the limit (see there) and :class:`KeyRejected` when no
    unrevoked key has the hash, besides what :func:`consume` raises. A product the team
    does not hold is ``not_found``.
    """
    params = [key_hash, stale, product_code, quantity, key, fingerprint, json.dumps(payload),
              user, user.lower(), service, job_id, occurred_at, now, wall,
              rate.window if rate else None, rate.limit if rate else 0]
    row = _execute(KEY_SQL, params, product_code=product_code, unit=None, quantity=quantity)
    if rate is not None:
        rate.count = row[6]
    if row[0] == "rate_limited":
        raise OverLimit
    if row[0] == "unauthorized":
        raise KeyRejected
    return _answer(row[:6], product_code=product_code, quantity=quantity, not_held_is_not_found=True)


def statement_row(sql: str, params: list) -> tuple:
    """The first row of one statement: in autocommit its own transaction (no BEGIN or
    COMMIT round trips), sent through libpq directly when it can be
    (``capacity_portal.postgresql.first_row``); inside a transaction in a savepoint (an
    error leaves the caller's transaction usable)."""
    if connection.in_atomic_block or not connection.get_autocommit():
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()
    row = first_row(connection, sql, params)  # (libpq directly: no cursor's Python around it)
    if row is not UNSUITABLE:
        return row
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _execute(sql: str, params: list, *, product_code: str, unit: str | None, quantity: int) -> tuple:
    """The function's row; its refusals as UsageErrors (``unit`` None: looked up only then)."""
    try:
        return statement_row(sql, params)
    except DatabaseError as exc:
        sqlstate = getattr(exc.__cause__, "sqlstate", None)
        if sqlstate in (FALLBACK, UNDEFINED_FUNCTION, UNKNOWN_TIME_ZONE):
            raise Fallback(str(exc.__cause__)) from None
        if sqlstate == OVER_LIMIT:
            raise OverLimit from None
        if sqlstate == INSUFFICIENT:
            available = int(str(exc.__cause__.diag.message_primary))
            if unit is None:
                from products.models import Product

                unit = Product.objects.values_list("unit", flat=True).get(code=product_code)
            raise insufficient_balance(unit, product_code, quantity, available) from None
        raise


def _answer(row: tuple, *, product_code: str, quantity: int, not_held_is_not_found: bool
            ) -> tuple[int, dict, bool, int]:
    outcome, event_id, available, total, status, response = row
    if outcome == "ok":
        body = {"id": event_id, "product": product_code, "available": int(available), "total": int(total),
                "kind": "consume", "quantity": quantity, "charged": quantity}
        return status, body, False, event_id
    if outcome == "replay":
        # Django's psycopg setup hands jsonb over as text (JSONField parses it itself).
        return status, json.loads(response) if isinstance(response, str) else response, True, event_id
    if outcome == "conflict":
        raise key_reused()
    if outcome == "returnable":
        raise returnable_not_consumable(product_code)
    if outcome == "not_held" and not_held_is_not_found:
        raise unknown_product(product_code)
    raise Fallback(outcome)
