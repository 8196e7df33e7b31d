"""Many usage events in one transaction, with the same results as one call each.

``usage_record_many`` gives every event the outcome the single-event services would
give it, in order, but writes in bulk: one claim of all idempotency keys, one locked
read per balance, then a handful of multi-row statements (events, ledger rows, lots,
rollups) whatever the number of events. Batches that check out or return capacity take
the event-by-event path (each in its own savepoint), which has the same semantics.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from products.models import CapacityType, Lot, Product, TeamProduct
from products.periods import local_date
from teams.models import Team

from .actors import Actor
from .errors import (
    InvalidRequest,
    UsageError,
    insufficient_balance,
    key_reused,
    returnable_not_consumable,
)
from .ledger import CAPACITY_FIELDS, ROLLUP_FIELDS, members_for, plan_draw, prepare_balance, totals
from .models import DailyBreakdown, DailyRollup, Event, Kind, LedgerEntry
from .services import (
    Outcome,
    _check_key,
    _clean_common,
    _payload,
    fingerprint,
    usage_checkout,
    usage_consume,
    usage_metered,
    usage_return,
)

FAST_KINDS = {"consume", "metered"}


@dataclass(frozen=True)
class UsageRequest:
    """One usage event as a caller reports it (the API's POST /usage body)."""

    kind: str
    product: Product
    quantity: int
    idempotency_key: str
    user: str = ""
    service: str = ""
    job_id: str = ""
    checkout_id: str = ""
    occurred_at: datetime | None = None


def usage_record(*, team: Team, request: UsageRequest, actor: Actor, now: datetime | None = None,
                 fast: bool = True) -> Outcome:
    """One event through the service of its kind (``fast``: see usage_consume)."""
    common = dict(team=team, product=request.product, quantity=request.quantity,
                  idempotency_key=request.idempotency_key, actor=actor, occurred_at=request.occurred_at, now=now)
    if request.kind == "consume":
        return usage_consume(user=request.user, service=request.service, job_id=request.job_id, fast=fast,
                             **common)
    if request.kind == "metered":
        return usage_metered(user=request.user, service=request.service, job_id=request.job_id, **common)
    if request.kind == "checkout":
        return usage_checkout(checkout_id=request.checkout_id, user=request.user, service=request.service,
                              job_id=request.job_id, **common)
    if request.kind == "return":
        return usage_return(checkout_id=request.checkout_id, **common)
    raise InvalidRequest(f"Unknown kind {request.kind!r}.")


def usage_record_many(*, team: Team, requests: list[UsageRequest], actor: Actor,
                      now: datetime | None = None) -> list[Outcome | UsageError]:
    """Record events in order; each gets its own Outcome or UsageError. All or nothing
    for the batch as a whole only in case of a crash: rejected events are simply not written."""
    now = now or timezone.now()
    with transaction.atomic():
        # Lock every balance the batch touches in a fixed order before any write, so two
        # batches of one team queue instead of deadlocking each other.
        product_ids = sorted({r.product.pk for r in requests})
        list(TeamProduct.objects.for_team(team).filter(product_id__in=product_ids)
             .select_for_update().order_by("product_id").values_list("pk", flat=True))
        if all(r.kind in FAST_KINDS for r in requests):
            try:
                with transaction.atomic():
                    return _record_fast(team, requests, actor, now)
            except IntegrityError:
                # A concurrent request claimed one of our keys first: the event-by-event
                # path below replays or rejects it exactly as a single call would.
                pass
        return [_one(team, r, actor, now) for r in requests]


def _one(team: Team, request: UsageRequest, actor: Actor, now: datetime) -> Outcome | UsageError:
    try:
        return usage_record(team=team, request=request, actor=actor, now=now)  # own savepoint
    except UsageError as exc:
        return exc


@dataclass
class _Planned:
    index: int
    request: UsageRequest
    operation: str
    payload: dict
    fp: str
    at: datetime
    draws: list  # [(lot, take)]
    charged: int
    carried: int | None
    available: int
    total: int
    event_id: int | None = None
    response: dict | None = None


def _record_fast(team: Team, requests: list[UsageRequest], actor: Actor, now: datetime) -> list[Outcome | UsageError]:
    results: list[Outcome | UsageError | None] = [None] * len(requests)
    keys = {r.idempotency_key for r in requests}
    existing = {e.key: e for e in Event.objects.for_team(team).filter(key__in=keys)}

    balances: dict[int, tuple[TeamProduct, list[Lot]]] = {}
    for product in sorted({r.product.pk: r.product for r in requests}.values(), key=lambda p: p.pk):
        balances[product.pk] = prepare_balance(team, product, now=now, actor=actor)
    carry = {pid: tp.metered_carry for pid, (tp, _) in balances.items()}

    planned: list[_Planned] = []
    claimed: dict[str, _Planned] = {}
    for index, request in enumerate(requests):
        product = request.product
        try:
            # The checks in the order the single-event services make them.
            at = _clean_common(request.quantity, request.occurred_at, now)
            operation = request.kind
            if operation == "consume" and product.capacity_type != CapacityType.EXHAUSTIBLE:
                raise returnable_not_consumable(product.code)
            if operation == "metered" and not product.metered:
                raise InvalidRequest(f"{product.code} is not a metered product: use kind=consume.")
            _check_key(request.idempotency_key)
            payload = _payload(product.code, request.quantity, request.occurred_at, user=request.user,
                               service=request.service, job_id=request.job_id)
            fp = fingerprint({"operation": operation, **payload})
            earlier = existing.get(request.idempotency_key) or claimed.get(request.idempotency_key)
            if earlier is not None:
                earlier_fp = earlier.fingerprint if isinstance(earlier, Event) else earlier.fp
                if earlier_fp != fp:
                    raise key_reused()
                results[index] = earlier  # replay: resolved once the original has its outcome
                continue
            _, lots = balances[product.pk]
            if operation == "metered":
                units, carried = divmod(carry[product.pk] + request.quantity, product.charge_unit_size)
            else:
                units, carried = request.quantity, None
            available, total = totals(lots)
            if available < units:
                raise insufficient_balance(product.unit, product.code, units, available)
            draws = plan_draw(lots, units) if units else []
            for lot, take in draws:
                lot.remaining -= take  # in memory; written once per lot below
            if carried is not None:
                carry[product.pk] = carried
            plan = _Planned(index, request, operation, payload, fp, at, draws, units, carried,
                            available - units, total)
            planned.append(plan)
            claimed[request.idempotency_key] = plan
        except UsageError as exc:
            results[index] = exc

    if planned:
        _write(team, actor, planned, balances, carry)
    for plan in planned:
        results[plan.index] = Outcome(201, plan.response, event_id=plan.event_id)
    return [_resolve(r) for r in results]


def _resolve(result) -> Outcome | UsageError:
    if isinstance(result, Event):
        return Outcome(result.status_code, result.response, replayed=True, event_id=result.pk)
    if isinstance(result, _Planned):
        return Outcome(201, result.response, replayed=True, event_id=result.event_id)
    return result


def _write(team: Team, actor: Actor, planned: list[_Planned], balances, carry) -> None:
    # 1. Claim the keys (a concurrent claim of one of them raises IntegrityError: see caller).
    # Each stored response names its own event id. On PostgreSQL the ids are reserved first
    # and events and ledger rows go in with COPY (no model instances); elsewhere bulk_create.
    connection = transaction.get_connection()
    copy = connection.vendor == "postgresql"
    members = members_for(team, {p.request.user for p in planned})
    actor_fields = actor.entry_fields()
    recorded = timezone.now()
    if copy:
        with connection.cursor() as cursor:
            cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                           [Event._meta.db_table, len(planned)])
            for plan, (pk,) in zip(planned, cursor.fetchall(), strict=True):
                plan.event_id, plan.response = pk, _response(plan, pk)
        api_key_id = actor.api_key.pk if actor.api_key else None
        user_id = actor.user.pk if actor.user else None
        _copy(connection, Event, ["id", "team_id", "key", "fingerprint", "operation", "request", "status_code",
                                  "response", "api_key_id", "actor_user_id", "created_at"],
              ((p.event_id, team.pk, p.request.idempotency_key, p.fp, p.operation, json.dumps(p.payload), 201,
                json.dumps(p.response), api_key_id, user_id, recorded) for p in planned))
    else:
        events = Event.objects.bulk_create([
            Event(team=team, key=p.request.idempotency_key, fingerprint=p.fp, operation=p.operation,
                  request=p.payload, status_code=201, api_key=actor.api_key, actor_user=actor.user)
            for p in planned
        ])
        for plan, event in zip(planned, events, strict=True):
            plan.event_id = event.pk
            event.response = plan.response = _response(plan, event.pk)
        Event.objects.bulk_update(events, ["response"])

    # 2. Ledger rows, one per (event, lot) draw.
    moved: dict[int, int] = defaultdict(int)
    rows = []
    for plan in planned:
        r = plan.request
        for lot, take in plan.draws:
            moved[lot.pk] += take
            rows.append((team.pk, r.product.pk, lot.pk, lot.grant_id, Kind.CONSUME.value, -take, take, plan.at,
                         recorded, actor_fields["actor"], user_id if copy else None, api_key_id if copy else None,
                         r.user, members.get(r.user), r.service, r.job_id, plan.event_id, ""))
    if copy:
        _copy(connection, LedgerEntry, ["team_id", "product_id", "lot_id", "grant_id", "kind", "delta", "amount",
                                        "occurred_at", "recorded_at", "actor", "actor_user_id", "actor_api_key_id",
                                        "user", "member_id", "service", "job_id", "event_id", "note"], rows)
    else:
        LedgerEntry.objects.bulk_create([
            LedgerEntry(team_id=row[0], product_id=row[1], lot_id=row[2], grant_id=row[3], kind=row[4],
                        delta=row[5], amount=row[6], occurred_at=row[7], user=row[12], member_id=row[13],
                        service=row[14], job_id=row[15], event_id=row[16], **actor_fields)
            for row in rows
        ], batch_size=2000)

    # 3. Lots and metered carries, once each (conditional: never below zero).
    for lot_id, take in moved.items():
        if Lot.objects.filter(pk=lot_id, remaining__gte=take).update(remaining=F("remaining") - take) != 1:
            raise RuntimeError(f"lot {lot_id} could not move by {-take}: concurrent change without lock")
    for product_id, (tp, _) in balances.items():
        if carry[product_id] != tp.metered_carry:
            TeamProduct.objects.filter(pk=tp.pk).update(metered_carry=carry[product_id])

    # 4. Rollups: the same sums as rollup_add per event, one statement per table.
    per_day: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(ROLLUP_FIELDS, 0))
    per_group: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(ROLLUP_FIELDS, 0))
    tz = team.tzinfo
    for plan in planned:
        r = plan.request
        day = local_date(plan.at, tz)
        for acc in (per_day[(r.product.pk, day)], per_group[(r.product.pk, day, r.service, r.user)]):
            acc["consumed"] += plan.charged
            if plan.operation == "metered":
                acc["raw_usage"] += r.quantity
    _upsert_many(DailyRollup, ("team_id", "product_id", "day"),
                 [((team.pk, pid, day), amounts) for (pid, day), amounts in per_day.items()])
    _upsert_many(DailyBreakdown, ("team_id", "product_id", "day", "service", "user"),
                 [((team.pk, pid, day, service, user), amounts)
                  for (pid, day, service, user), amounts in per_group.items()])


def _copy(connection, model, columns: list[str], rows) -> None:
    """COPY rows into a model's table (PostgreSQL): the fastest way in, checks and triggers included."""
    qn = connection.ops.quote_name
    sql = f"COPY {qn(model._meta.db_table)} ({', '.join(qn(c) for c in columns)}) FROM STDIN"
    connection.ensure_connection()
    with connection.connection.cursor() as cursor, cursor.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)


def _response(plan: _Planned, event_id: int) -> dict:
    body = {"id": event_id, "product": plan.request.product.code, "available": plan.available,
            "total": plan.total, "kind": plan.operation, "quantity": plan.request.quantity, "charged": plan.charged}
    if plan.carried is not None:
        body["carried"] = plan.carried
    return body


def _upsert_many(model, key_fields: tuple[str, ...], rows: list[tuple[tuple, dict]]) -> None:
    """Multi-row ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``."""
    if not rows:
        return
    connection = transaction.get_connection()
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    fields = ROLLUP_FIELDS + (CAPACITY_FIELDS if model is DailyRollup else ())
    extra = ("peak_checked_out", "closing_checked_out") if model is DailyRollup else ()
    columns = list(key_fields) + list(fields) + list(extra)
    day_at = key_fields.index("day")
    params: list = []
    for key, amounts in rows:
        key = list(key)
        key[day_at] = connection.ops.adapt_datefield_value(key[day_at])
        params.extend(key + [amounts.get(name, 0) for name in fields] + [0] * len(extra))
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    sets = ", ".join(f"{qn(n)} = {table}.{qn(n)} + excluded.{qn(n)}" for n in fields)
    sql = (f"INSERT INTO {table} ({', '.join(qn(c) for c in columns)}) VALUES {', '.join([one] * len(rows))} "
           f"ON CONFLICT ({', '.join(qn(c) for c in key_fields)}) DO UPDATE SET {sets}")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
