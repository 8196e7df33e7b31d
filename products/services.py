"""Grant services: the only way capacity enters (or leaves by revocation) a team."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from teams.models import Team
from usage.actors import Actor
from usage.errors import IdempotencyConflict, InvalidRequest
from usage.ledger import NEVER_DUE, close_lot, create_lot, lock_team_product
from usage.models import Event, Kind

from .models import Grant, Lot, Product, Refresh, Source, TeamProduct
from .periods import _add_months, period_bounds, period_count, period_index_at

# Tokens per licence per subscription term (seed: cloud tokens FAQ).
SUBSCRIPTION_GIFT_TABLE = {
    "annual": ("Annual", 100, 12),
    "quarterly": ("Quarterly", 150, 3),
    "2_years": ("2 years", 500, 24),
    "3_years": ("3 years", 500, 36),
}


@dataclass(frozen=True)
class GiftPlan:
    quantity: int
    starts_at: datetime
    ends_at: datetime
    term_label: str


def subscription_gift_plan(*, licences: int, term: str, starts_at: datetime, team: Team) -> GiftPlan:
    """licences x tokens-per-licence for the term, expiring at the end of the term."""
    if term not in SUBSCRIPTION_GIFT_TABLE:
        raise InvalidRequest(f"Unknown subscription term {term!r}.")
    if licences < 1:
        raise InvalidRequest("Licences must be at least 1.")
    label, per_licence, months = SUBSCRIPTION_GIFT_TABLE[term]
    local = starts_at.astimezone(team.tzinfo)
    ends_local = _add_months(local.replace(tzinfo=None), months, local.day).replace(tzinfo=team.tzinfo)
    return GiftPlan(quantity=licences * per_licence, starts_at=starts_at, ends_at=ends_local, term_label=label)


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@transaction.atomic
def grant_create(
    *,
    team: Team,
    product: Product,
    quantity: int,
    ends_at: datetime,
    starts_at: datetime | None = None,
    source: str = Source.PURCHASE,
    refresh: str = Refresh.NEVER,
    created_by=None,
    note: str = "",
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> Grant:
    """Give capacity: the grant, its first lot and the ``grant`` ledger row, atomically."""
    now = now or timezone.now()
    starts_at = starts_at or now
    if not isinstance(quantity, int) or quantity <= 0:
        raise InvalidRequest("Quantity must be a positive whole number.")
    if ends_at <= starts_at:
        raise InvalidRequest("The grant must end after it starts.")
    if source not in Source.values:
        raise InvalidRequest(f"Unknown source {source!r}.")
    if refresh not in Refresh.values:
        raise InvalidRequest(f"Unknown refresh {refresh!r}.")
    actor = Actor.for_user(created_by)
    payload = {
        "product": product.code, "quantity": quantity, "source": source, "refresh": refresh,
        "starts_at": starts_at.isoformat(), "ends_at": ends_at.isoformat(), "note": note,
    }
    tp = lock_team_product(team, product)
    event = None
    if idempotency_key:
        existing = Event.objects.for_team(team).filter(key=idempotency_key).first()
        if existing:
            if existing.fingerprint != _fingerprint(payload):
                raise IdempotencyConflict("This idempotency key was used for a different request.")
            return Grant.objects.get(pk=existing.response["grant_id"])
        event = Event.objects.create(
            team=team, key=idempotency_key, fingerprint=_fingerprint(payload), operation="grant",
            request=payload, actor_user=actor.user,
        )
    grant = Grant.objects.create(
        team=team, product=product, quantity=quantity, source=source, starts_at=starts_at,
        ends_at=ends_at, refresh=refresh, created_by=actor.user, note=note,
    )
    # The period in force now (the first one for a grant starting later, the last one
    # for a grant entered after its end): the grant always gets its lot and its row.
    if refresh == Refresh.MONTHLY:
        k = max(period_index_at(starts_at, team.tzinfo, max(now, starts_at)), 0)
        k = min(k, period_count(starts_at, ends_at, team.tzinfo) - 1)
        start, end = period_bounds(starts_at, ends_at, team.tzinfo, k)
    else:
        k, start, end = 0, starts_at, ends_at
    create_lot(grant, k=k, start=start, end=end, kind=Kind.GRANT, actor=actor, event=event)
    if refresh == Refresh.MONTHLY:
        # A new monthly grant brings new period boundaries: the next write rechecks them.
        TeamProduct.objects.filter(pk=tp.pk).update(refresh_checked_at=None, refresh_due_at=None)
    elif tp.refresh_checked_at is None and not _has_live_monthly_grant(tp, now):
        # No monthly period will ever open on this balance (until a monthly grant comes):
        # say so now, so that its first consume already takes the one-round-trip path.
        TeamProduct.objects.filter(pk=tp.pk).update(refresh_checked_at=now, refresh_due_at=NEVER_DUE)
    if event:
        event.status_code = 201
        event.response = {"grant_id": grant.pk}
        event.save(update_fields=["status_code", "response"])
    return grant


def _has_live_monthly_grant(tp: TeamProduct, now: datetime) -> bool:
    return (Grant.objects.filter(team_id=tp.team_id, product_id=tp.product_id, refresh=Refresh.MONTHLY)
            .unrevoked().filter(ends_at__gt=now).exists())


@transaction.atomic
def grant_revoke(*, grant: Grant, revoked_by=None, now: datetime | None = None, note: str = "") -> Grant:
    """Revoke a grant: its open lots are zeroed with ``revoke`` rows. Twice is a no-op."""
    now = now or timezone.now()
    actor = Actor.for_user(revoked_by)
    lock_team_product(grant.team, grant.product)
    grant = Grant.objects.select_for_update().get(pk=grant.pk)
    if grant.revoked_at is not None:
        return grant
    grant.revoked_at = now
    grant.save(update_fields=["revoked_at"])
    for lot in Lot.objects.filter(grant=grant, closed_at__isnull=True).select_for_update().order_by("id"):
        kind = Kind.REVOKE if lot.expires_at > now else Kind.EXPIRE
        close_lot(lot, kind=kind, at=now if kind == Kind.REVOKE else lot.expires_at, now=now, actor=actor, team=grant.team,
                  note=note or ("grant revoked" if kind == Kind.REVOKE else ""))
    return grant
