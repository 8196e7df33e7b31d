"""Alerts: email a team's admins when a balance crosses a line, once per crossing.

Conditions of one balance (team, product), evaluated at read time with the balance
selector:

- ``low``: red, ``available / total <= 20%`` (the card's exact rule);
- ``empty``: exhausted, nothing available of a non-zero total;
- ``used:<pct>``: the team's extra thresholds (``Team.alert_thresholds``, percent used);
- ``grant_ending:<grant id>``: an active grant ends within 30 days.

Each condition has an :class:`~usage.models.AlertState` row. Turning it on is claimed
with ``UPDATE ... WHERE active = false``: whoever updates the row sends the email,
so two checkers never send it twice. A condition that is false again resets the row,
so the next crossing is told again. If sending fails the claim is released and the
next check retries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F
from django.template.loader import render_to_string
from django.urls import get_script_prefix, reverse
from django.utils import timezone

from products.models import Grant, TeamProduct
from products.selectors import Balance, product_balance
from teams.models import Membership, Team

from .ledger import lock_team_product
from .models import AlertState

logger = logging.getLogger("usage.alerts")

RED_KEY = "low"
EMPTY_KEY = "empty"
GRANT_ENDING_DAYS = 30


@dataclass(frozen=True)
class Alert:
    key: str
    severity: int  # higher first in the email
    line: str


def balance_conditions(balance: Balance | None, team: Team) -> dict[str, bool]:
    """Which balance-level alert conditions hold (exact integer comparisons)."""
    has = balance is not None and balance.total > 0
    available = balance.available if has else 0
    total = balance.total if has else 0
    conditions = {
        EMPTY_KEY: has and available == 0,
        RED_KEY: has and 5 * available <= total,
    }
    for pct in sorted({t for t in (team.alert_thresholds or []) if isinstance(t, int) and 0 < t < 100}):
        conditions[f"used:{pct}"] = has and (total - available) * 100 >= pct * total
    return conditions


def grant_conditions(grants: list[Grant], *, now: datetime) -> dict[str, bool]:
    soon = now + timedelta(days=GRANT_ENDING_DAYS)
    return {f"grant_ending:{g.pk}": g.starts_at <= now < g.ends_at <= soon for g in grants}


def _describe(key: str, balance: Balance | None, grants: dict[int, Grant], team: Team, now: datetime) -> Alert:
    unit = balance.product.unit if balance else ""
    if key == EMPTY_KEY:
        return Alert(key, 300, f"is exhausted: 0 of {balance.total} {unit} available.")
    if key == RED_KEY:
        return Alert(key, 200, f"is running low: {balance.available} of {balance.total} {unit} available "
                               f"({balance.available_pct}%).")
    if key.startswith("used:"):
        pct = int(key.split(":", 1)[1])
        return Alert(key, 100 + pct // 10, f"has passed {pct}% used: {balance.used_pct}% used "
                                           f"({balance.available} of {balance.total} {unit} available).")
    grant = grants[int(key.split(":", 1)[1])]
    ends = timezone.localtime(grant.ends_at, team.tzinfo)
    days = (ends.date() - timezone.localtime(now, team.tzinfo).date()).days
    return Alert(key, 50, f"has a grant of {grant.quantity} {grant.product.unit} ({grant.get_source_display()}) "
                          f"ending on {ends:%Y-%m-%d %H:%M} ({days} days).")


def portal_link(viewname: str, **kwargs) -> str:
    """The absolute address of a portal page for an email ("" when ``PORTAL_URL`` is empty)."""
    if not settings.PORTAL_URL:
        return ""
    # PORTAL_URL holds any path prefix itself; inside a request reverse() would add the
    # request's script prefix once more (eager tasks run there).
    path = reverse(viewname, kwargs=kwargs).removeprefix(get_script_prefix())
    return f"{settings.PORTAL_URL}/{path}"


def team_admin_emails(team: Team) -> list[str]:
    return sorted({
        m.user.email for m in Membership.objects.for_team(team).admins().select_related("user")
        if m.user.email and m.user.is_active
    })


def alerts_check_team_product(*, team_product_id: int, now: datetime | None = None) -> list[str]:
    """Evaluate one balance's alerts; email the admins about new crossings. Returns the keys sent."""
    now = now or timezone.now()
    tp = TeamProduct.objects.select_related("team", "product").filter(pk=team_product_id).first()
    if tp is None:
        return []
    team, product = tp.team, tp.product
    with transaction.atomic():
        # Serialises with writes to this balance and with other checkers of it.
        lock_team_product(team, product)
        balance = product_balance(team, product, now=now)
        grants = list(
            Grant.objects.for_team(team).filter(product=product).active_at(now)
            .filter(ends_at__lte=now + timedelta(days=GRANT_ENDING_DAYS)).select_related("product")
        )
        conditions = {**balance_conditions(balance, team), **grant_conditions(grants, now=now)}
        states = AlertState.objects.filter(team=team, product=product)
        # Recovered (or no longer relevant): reset, so the next crossing is told again.
        states.filter(active=True).exclude(key__in=[k for k, on in conditions.items() if on]).update(
            active=False, cleared_at=now)
        fired = []
        for key, on in conditions.items():
            if not on:
                continue
            try:
                with transaction.atomic():
                    AlertState.objects.get_or_create(team=team, product=product, key=key)
            except IntegrityError:  # created meanwhile by a concurrent checker
                pass
            # Claim the crossing: only one checker turns the row on.
            if states.filter(key=key, active=False).update(active=True, fired_at=now,
                                                           times_fired=F("times_fired") + 1):
                fired.append(key)
    if not fired:
        return []
    by_id = {g.pk: g for g in grants}
    alerts = sorted((_describe(k, balance, by_id, team, now) for k in fired), key=lambda a: -a.severity)
    recipients = team_admin_emails(team)
    if not recipients:
        logger.warning("alerts %s for %s/%s: the team has no admin with an email", fired, team.slug, product.code)
        return fired
    try:
        context = {"team": team, "product": product, "balance": balance, "alerts": alerts, "top": alerts[0],
                   "details_url": portal_link("usage:product_detail", slug=team.slug, code=product.code)}
        subject = " ".join(render_to_string("usage/email/alert_subject.txt", context).split())
        body = render_to_string("usage/email/alert_body.txt", context)
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)
    except Exception:
        # Release the claims so the next check retries: an alert is never silently lost.
        AlertState.objects.filter(team=team, product=product, key__in=fired, active=True, fired_at=now).update(
            active=False, times_fired=F("times_fired") - 1)
        logger.exception("alert email for %s/%s failed; will retry", team.slug, product.code)
        return []
    logger.info("alert %s sent for %s/%s to %d admins", fired, team.slug, product.code, len(recipients))
    return fired


def team_product_id(*, team_id: int, product_id: int) -> int | None:
    return TeamProduct.objects.filter(team_id=team_id, product_id=product_id).values_list("pk", flat=True).first()


def balances_to_check() -> list[int]:
    return list(TeamProduct.objects.order_by("pk").values_list("pk", flat=True))
