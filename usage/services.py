"""Usage services: consume, checkout, return, metered usage and job refunds.

Each write runs in one transaction that (1) claims its idempotency key,
(2) locks the balance's ``TeamProduct`` row, (3) moves lots with their ledger rows
and rollups, (4) stores the response for replays. A rejected request rolls back
whole: nothing is written, not even the idempotency record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from products.models import CapacityType, Lot, Product, TeamProduct
from teams.models import Team

from . import fastpath
from .actors import Actor
from .errors import (
    CheckoutExceeded,
    CheckoutExists,
    InvalidRequest,
    NotFound,
    insufficient_balance,
    key_reused,
    returnable_not_consumable,
)
from .ledger import (
    apply_lot_delta,
    member_id_for,
    plan_draw,
    prepare_balance,
    rollup_add,
    totals,
)
from .models import Checkout, Event, Kind, LedgerEntry


@dataclass
class Outcome:
    """What a write returns (and what a replay returns again)."""

    status_code: int
    body: dict
    replayed: bool = False
    event_id: int | None = None
    entries: list = field(default_factory=list)


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _idempotent(team: Team, key: str, operation: str, payload: dict, actor: Actor,
                write: Callable[[Event], tuple[int, dict]]) -> Outcome:
    _check_key(key)
    fp = fingerprint({"operation": operation, **payload})
    with transaction.atomic():
        # Claim the key. A concurrent request with the same key blocks here on the
        # unique index until we commit (then it replays) or roll back (then it runs).
        event = _claim(team, key, fp, operation, payload, actor)
        if event is None:
            existing = Event.objects.for_team(team).get(key=key)
            if existing.fingerprint != fp:
                raise key_reused()
            return Outcome(existing.status_code, existing.response, replayed=True, event_id=existing.pk)
        status, body = write(event)
        event.status_code, event.response = status, body
        event.save(update_fields=["status_code", "response"])
        return Outcome(status, body, event_id=event.pk)


def _check_key(key: str) -> None:
    if not key or len(key) > 255:
        raise InvalidRequest("idempotency_key must be 1 to 255 characters.")


def _claim(team: Team, key: str, fp: str, operation: str, payload: dict, actor: Actor) -> Event | None:
    """Insert the key's Event, or None if the key is taken (by a committed request)."""
    event = Event(team=team, key=key, fingerprint=fp, operation=operation, request=payload,
                  api_key=actor.api_key, actor_user=actor.user, created_at=timezone.now())
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        try:
            with transaction.atomic():  # savepoint: the failed insert must not spoil the transaction
                event.save(force_insert=True)
        except IntegrityError:
            return None
        return event
    # PostgreSQL: one round trip, no savepoint (ON CONFLICT DO NOTHING on the unique key).
    qn = connection.ops.quote_name
    fields = [f for f in Event._meta.concrete_fields if not f.primary_key]
    values = [f.get_db_prep_save(getattr(event, f.attname), connection) for f in fields]
    sql = (f"INSERT INTO {qn(Event._meta.db_table)} ({', '.join(qn(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))}) ON CONFLICT (team_id, key) DO NOTHING RETURNING id")
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        row = cursor.fetchone()
    if row is None:
        return None
    event.pk = row[0]
    event._state.adding = False
    return event


def _clean_common(quantity: int, occurred_at: datetime | None, now: datetime) -> datetime:
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
        raise InvalidRequest("quantity must be a positive whole number.")
    if quantity > 10**15:
        raise InvalidRequest("quantity is too large.")
    return occurred_at or now


def _payload(product_code: str, quantity: int, occurred_at: datetime | None, **extra) -> dict:
    return {
        "product": product_code, "quantity": quantity,
        "occurred_at": occurred_at.isoformat() if occurred_at else None, **extra,
    }


def _balance_body(event: Event, product: Product, lots: list[Lot], **extra) -> dict:
    available, total = totals(lots)
    return {"id": event.pk, "product": product.code, "available": available, "total": total, **extra}


def _draw(*, team: Team, product: Product, tp: TeamProduct, lots: list[Lot], quantity: int, kind: str,
          event: Event, actor: Actor, occurred_at: datetime, user: str, service: str, job_id: str,
          checkout: Checkout | None = None) -> list[LedgerEntry]:
    available, _ = totals(lots)
    if available < quantity:
        raise insufficient_balance(product.unit, product.code, quantity, available)
    member_id = member_id_for(team, user)
    entries = []
    for lot, take in plan_draw(lots, quantity):
        apply_lot_delta(lot, -take)
        entries.append(LedgerEntry(
            team=team, product=product, lot=lot, grant_id=lot.grant_id, kind=kind, delta=-take, amount=take,
            occurred_at=occurred_at, user=user, member_id=member_id, service=service, job_id=job_id,
            event=event, checkout=checkout, **actor.entry_fields(),
        ))
    return LedgerEntry.objects.bulk_create(entries)


def usage_consume(*, team: Team, product: Product, quantity: int, idempotency_key: str, actor: Actor,
                  user: str = "", service: str = "", job_id: str = "", occurred_at: datetime | None = None,
                  now: datetime | None = None, fast: bool = True) -> Outcome:
    """Spend exhaustible capacity, in consumption order. No overdraft, ever.

    ``fast=False``: the caller has just been told the one-round-trip path does not apply.
    """
    now = now or timezone.now()
    at = _clean_common(quantity, occurred_at, now)
    if product.capacity_type != CapacityType.EXHAUSTIBLE:
        raise returnable_not_consumable(product.code)
    payload = _payload(product.code, quantity, occurred_at, user=user, service=service, job_id=job_id)
    if fast and fastpath.enabled():
        try:
            return _consume_fast(team=team, product_code=product.code, unit=product.unit, quantity=quantity,
                                 key=idempotency_key, payload=payload, actor=actor, user=user, service=service,
                                 job_id=job_id, at=at, now=now)
        except fastpath.Fallback:
            pass  # something is due on the balance (or it has no row yet): the Python path does it

    def write(event: Event) -> tuple[int, dict]:
        tp, lots = prepare_balance(team, product, now=now, actor=actor)
        _draw(team=team, product=product, tp=tp, lots=lots, quantity=quantity, kind=Kind.CONSUME, event=event,
              actor=actor, occurred_at=at, user=user, service=service, job_id=job_id)
        rollup_add(team, product.pk, at=at, service=service, user=user, consumed=quantity)
        return 201, _balance_body(event, product, lots, kind="consume", quantity=quantity, charged=quantity)

    return _idempotent(team, idempotency_key, "consume", payload, actor, write)


def usage_consume_with_key(*, key_hash: str, key_stale: datetime, product_code: str, quantity: int,
                           idempotency_key: str, user: str = "", service: str = "", job_id: str = "",
                           occurred_at: datetime | None = None, now: datetime | None = None,
                           rate: fastpath.RateCount | None = None) -> Outcome | None:
    """The API's consume: its key (by hash) and the product (by code) are found in the
    same single round trip, the key is the actor. With ``rate``, the same statement counts
    the request against the key's rate limit (see ``fastpath.consume_with_key``).

    A product the key's team does not hold is ``NotFound``; a key that is unknown or
    revoked raises ``fastpath.KeyRejected`` (nothing written but its rate count), one past
    its rate limit ``fastpath.OverLimit``. None when the
    one-round-trip path does not apply (not PostgreSQL, or something is due on the
    balance): the caller then looks the key and the product up and calls
    :func:`usage_consume`.
    """
    if not fastpath.enabled():
        return None
    now = now or timezone.now()
    at = _clean_common(quantity, occurred_at, now)
    _check_key(idempotency_key)
    payload = _payload(product_code, quantity, occurred_at, user=user, service=service, job_id=job_id)
    try:
        status, body, replayed, event_id = fastpath.consume_with_key(
            key_hash=key_hash, stale=key_stale, product_code=product_code, quantity=quantity, key=idempotency_key,
            fingerprint=fingerprint({"operation": "consume", **payload}), payload=payload, user=user,
            service=service, job_id=job_id, occurred_at=at, now=now, wall=timezone.now(), rate=rate,
        )
    except fastpath.Fallback:
        return None
    return Outcome(status, body, replayed=replayed, event_id=event_id)


def _consume_fast(*, team: Team, product_code: str, unit: str, quantity: int, key: str, payload: dict,
                  actor: Actor, user: str, service: str, job_id: str, at: datetime, now: datetime) -> Outcome:
    _check_key(key)
    status, body, replayed, event_id = fastpath.consume(
        team=team, product_code=product_code, unit=unit, quantity=quantity, key=key,
        fingerprint=fingerprint({"operation": "consume", **payload}), payload=payload, actor=actor,
        user=user, service=service, job_id=job_id, occurred_at=at, now=now, wall=timezone.now(),
    )
    return Outcome(status, body, replayed=replayed, event_id=event_id)


def usage_metered(*, team: Team, product: Product, quantity: int, idempotency_key: str, actor: Actor,
                  user: str = "", service: str = "", job_id: str = "", occurred_at: datetime | None = None,
                  now: datetime | None = None) -> Outcome:
    """Add raw usage; consume one unit each time the accumulated raw usage reaches the unit size."""
    now = now or timezone.now()
    at = _clean_common(quantity, occurred_at, now)
    if not product.metered:
        raise InvalidRequest(f"{product.code} is not a metered product: use kind=consume.")
    payload = _payload(product.code, quantity, occurred_at, user=user, service=service, job_id=job_id)

    def write(event: Event) -> tuple[int, dict]:
        tp, lots = prepare_balance(team, product, now=now, actor=actor)
        units, carry = divmod(tp.metered_carry + quantity, product.charge_unit_size)
        if units:
            _draw(team=team, product=product, tp=tp, lots=lots, quantity=units, kind=Kind.CONSUME, event=event,
                  actor=actor, occurred_at=at, user=user, service=service, job_id=job_id)
        TeamProduct.objects.filter(pk=tp.pk).update(metered_carry=carry)
        rollup_add(team, product.pk, at=at, service=service, user=user, consumed=units, raw_usage=quantity)
        return 201, _balance_body(event, product, lots, kind="metered", quantity=quantity, charged=units,
                                  carried=carry)

    return _idempotent(team, idempotency_key, "metered", payload, actor, write)


def usage_checkout(*, team: Team, product: Product, quantity: int, checkout_id: str, idempotency_key: str,
                   actor: Actor, user: str = "", service: str = "", job_id: str = "",
                   occurred_at: datetime | None = None, now: datetime | None = None) -> Outcome:
    """Check returnable capacity out of the pool under the caller's checkout_id."""
    now = now or timezone.now()
    at = _clean_common(quantity, occurred_at, now)
    if product.capacity_type != CapacityType.RETURNABLE:
        raise InvalidRequest(f"{product.code} is exhaustible capacity: use kind=consume.")
    if not checkout_id or len(checkout_id) > 255:
        raise InvalidRequest("checkout_id (1 to 255 characters) is required for a checkout.")
    payload = _payload(product.code, quantity, occurred_at, checkout_id=checkout_id, user=user, service=service,
                       job_id=job_id)

    def write(event: Event) -> tuple[int, dict]:
        tp, lots = prepare_balance(team, product, now=now, actor=actor)
        if Checkout.objects.filter(team=team, product=product, checkout_id=checkout_id).exists():
            raise CheckoutExists(f"checkout_id {checkout_id!r} is already used for {product.code}.")
        checkout = Checkout.objects.create(team=team, product=product, checkout_id=checkout_id, quantity=quantity,
                                           user=user, service=service, occurred_at=at)
        _draw(team=team, product=product, tp=tp, lots=lots, quantity=quantity, kind=Kind.CHECKOUT, event=event,
              actor=actor, occurred_at=at, user=user, service=service, job_id=job_id, checkout=checkout)
        TeamProduct.objects.filter(pk=tp.pk).update(checked_out=F("checked_out") + quantity)
        rollup_add(team, product.pk, at=at, service=service, user=user, checked_out=quantity,
                   level=tp.checked_out + quantity)
        return 201, _balance_body(event, product, lots, kind="checkout", quantity=quantity,
                                  checkout_id=checkout_id, outstanding=quantity)

    return _idempotent(team, idempotency_key, "checkout", payload, actor, write)


def usage_return(*, team: Team, product: Product, quantity: int, checkout_id: str, idempotency_key: str,
                 actor: Actor, occurred_at: datetime | None = None, now: datetime | None = None) -> Outcome:
    """Return checked-out capacity to the lots it came from (an expired lot takes nothing back)."""
    now = now or timezone.now()
    at = _clean_common(quantity, occurred_at, now)
    if product.capacity_type != CapacityType.RETURNABLE:
        raise InvalidRequest(f"{product.code} is exhaustible capacity: nothing to return.")
    if not checkout_id:
        raise InvalidRequest("checkout_id is required for a return.")
    payload = _payload(product.code, quantity, occurred_at, checkout_id=checkout_id)

    def write(event: Event) -> tuple[int, dict]:
        tp, lots = prepare_balance(team, product, now=now, actor=actor)
        checkout = (
            Checkout.objects.select_for_update().filter(team=team, product=product, checkout_id=checkout_id).first()
        )
        if checkout is None:
            raise NotFound(f"No checkout {checkout_id!r} for {product.code}.")
        if quantity > checkout.outstanding:
            raise CheckoutExceeded(
                f"Checkout {checkout_id!r} holds {checkout.outstanding}; cannot return {quantity}.",
            )
        held: dict[int, int] = {}
        order: list[int] = []
        for entry in checkout.entries.order_by("id"):
            if entry.kind == Kind.CHECKOUT:
                held[entry.lot_id] = held.get(entry.lot_id, 0) + entry.amount
                order.append(entry.lot_id)
            elif entry.kind == Kind.RETURN:
                held[entry.lot_id] -= entry.amount
        active = {lot.pk: lot for lot in lots}
        member_id = member_id_for(team, checkout.user)
        left = quantity
        entries = []
        for lot_id in reversed(order):  # last drawn, first returned
            give = min(held[lot_id], left)
            if give <= 0:
                continue
            held[lot_id] -= give
            left -= give
            lot = active.get(lot_id)
            if lot is not None:
                apply_lot_delta(lot, give)
            entries.append(LedgerEntry(
                team=team, product=product, lot_id=lot_id, kind=Kind.RETURN, delta=give if lot else 0,
                amount=give, occurred_at=at, user=checkout.user, member_id=member_id, service=checkout.service,
                event=event, checkout=checkout, note="" if lot else "lot expired: nothing restored",
                **actor.entry_fields(),
            ))
            if not left:
                break
        LedgerEntry.objects.bulk_create(entries)
        Checkout.objects.filter(pk=checkout.pk).update(returned=F("returned") + quantity)
        TeamProduct.objects.filter(pk=tp.pk).update(checked_out=F("checked_out") - quantity)
        rollup_add(team, product.pk, at=at, service=checkout.service, user=checkout.user, returned=quantity,
                   level=tp.checked_out - quantity)
        return 201, _balance_body(event, product, lots, kind="return", quantity=quantity, checkout_id=checkout_id,
                                  outstanding=checkout.outstanding - quantity)

    return _idempotent(team, idempotency_key, "return", payload, actor, write)


def job_refund(*, team: Team, job_id: str, idempotency_key: str, actor: Actor, reason: str = "failed",
               now: datetime | None = None) -> Outcome:
    """Give a failed or cancelled job back exactly what it consumed, to the same lots, once.

    Each consume row is reversed by at most one refund row (unique ``reverses``), so
    refunding twice refunds once. A lot that has ended takes its refund as a
    recorded no-op (delta 0).
    """
    now = now or timezone.now()
    if not job_id or len(job_id) > 255:
        raise InvalidRequest("job_id must be 1 to 255 characters.")
    if reason not in ("failed", "cancelled"):
        raise InvalidRequest("reason must be 'failed' or 'cancelled'.")
    payload = {"job_id": job_id, "reason": reason}

    def write(event: Event) -> tuple[int, dict]:
        consumed = LedgerEntry.objects.for_team(team).filter(job_id=job_id, kind=Kind.CONSUME)
        product_ids = sorted(set(consumed.values_list("product_id", flat=True)))
        if not product_ids:
            raise NotFound(f"No consumption recorded for job {job_id!r}.")
        products = {p.pk: p for p in Product.objects.filter(pk__in=product_ids)}
        refunded = restored = 0
        per_product = []
        for product_id in product_ids:  # lock balances in a fixed order: no deadlocks
            product = products[product_id]
            tp, lots = prepare_balance(team, product, now=now, actor=actor)
            active = {lot.pk: lot for lot in lots}
            pending = list(consumed.filter(product_id=product_id, reversed_by__isnull=True).order_by("id"))
            entries = []
            for original in pending:
                lot = active.get(original.lot_id)
                if lot is not None:
                    apply_lot_delta(lot, original.amount)
                entries.append(LedgerEntry(
                    team=team, product=product, lot_id=original.lot_id, grant_id=original.grant_id,
                    kind=Kind.REFUND, delta=original.amount if lot else 0, amount=original.amount,
                    occurred_at=now, user=original.user, member_id=original.member_id, service=original.service,
                    job_id=job_id, event=event, reverses=original,
                    note=f"job {reason}" + ("" if lot else "; lot ended: nothing restored"),
                    **actor.entry_fields(),
                ))
                refunded += original.amount
                restored += original.amount if lot else 0
                rollup_add(team, product.pk, at=now, service=original.service, user=original.user,
                           refunded=original.amount if lot else 0)
            LedgerEntry.objects.bulk_create(entries)
            available, total = totals(lots)
            per_product.append({"product": product.code, "refunded": sum(e.amount for e in entries),
                                "available": available, "total": total})
        return 200, {"id": event.pk, "job_id": job_id, "refunded": refunded, "restored": restored,
                     "products": per_product}

    return _idempotent(team, idempotency_key, "refund", payload, actor, write)

