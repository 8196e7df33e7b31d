"""Team pages: home redirect, team picker and the balances dashboard."""

from __future__ import annotations

import hashlib
from pathlib import Path

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.db.models import F
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET

from products.selectors import team_balances

from .access import get_team_for_user
from .models import ADMIN_ROLES, Membership, Team
from .services import membership_mark_seen, membership_needs_mark

POLL_SECONDS = 10
CARD_TEMPLATE = "teams/dashboard.html#card"
# Rendered cards are cached by everything they show (see render_cards); the template's own
# hash is part of the key, so a changed template never serves old HTML.
_TEMPLATE_VERSION = hashlib.sha1(
    (Path(settings.BASE_DIR) / "templates" / "teams" / "dashboard.html").read_bytes()
).hexdigest()[:12]
CARD_CACHE_SECONDS = 3600


def _card_key(team: Team, balance, details_url: str) -> str:
    p = balance.product
    shown = (
        team.timezone, p.code, p.name, p.unit, p.capacity_type, balance.status, balance.available, balance.total,
        str(balance.used_pct), str(balance.available_pct), balance.purchased, balance.checked_out,
        balance.ends_at and balance.ends_at.isoformat(), balance.ends_label,
        balance.refreshes_at and balance.refreshes_at.isoformat(), balance.refreshes_label,
        balance.runs_out_in_days, details_url,
    )
    return f"card:{_TEMPLATE_VERSION}:" + hashlib.sha1(repr(shown).encode()).hexdigest()


def render_cards(team: Team, balances) -> list[dict]:
    """Each balance with its rendered card.

    The numbers are always fresh (the selector runs on every request); only the HTML of
    a card whose every shown value is unchanged comes from the cache: the 10-second poll
    of a 50-product team then renders only the cards that moved. One cache round trip.
    """
    cards = []
    # One reverse() for the team, not one per card: the product code is the URL's last
    # segment (codes are slugs: safe in a path).
    prefix = _product_url(team.slug, "-")[: -len("-/")]
    for b in balances:
        url = f"{prefix}{b.product.code}/"
        cards.append({"balance": b, "details_url": url, "key": _card_key(team, b, url)})
    cached = cache.get_many([c["key"] for c in cards]) if cards else {}
    fresh = {}
    for card in cards:
        html = cached.get(card["key"])
        if html is None:
            html = fresh[card["key"]] = render_to_string(CARD_TEMPLATE, {"card": card, "team": team})
        card["html"] = mark_safe(html)  # noqa: S308 (our own template's output)
    if fresh:
        cache.set_many(fresh, CARD_CACHE_SECONDS)
    return cards


def _my_usage_url(slug: str) -> str:
    return reverse("usage:my_usage", kwargs={"slug": slug})


def _product_url(slug: str, code: str) -> str:
    return reverse("usage:product_detail", kwargs={"slug": slug, "code": code})


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """Admins go to the team they last opened, plain users to their own usage, else the picker."""
    memberships = list(
        Membership.objects.filter(user=request.user)
        .select_related("team")
        .order_by(F("last_seen_at").desc(nulls_last=True), "team__name")
    )
    admin_of = [m for m in memberships if m.is_admin]
    if admin_of:
        if admin_of[0].last_seen_at is not None:
            return redirect("teams:dashboard", slug=admin_of[0].team.slug)
        if len(memberships) == 1:
            return redirect("teams:dashboard", slug=admin_of[0].team.slug)
    elif len(memberships) == 1 or (memberships and memberships[0].last_seen_at is not None):
        return redirect(_my_usage_url(memberships[0].team.slug))
    return redirect("teams:picker")


@require_GET
@login_required
def picker(request: HttpRequest) -> HttpResponse:
    """Every team the user belongs to: admins open the dashboard, users their own usage."""
    memberships = Membership.objects.filter(user=request.user).select_related("team").order_by("team__name")
    rows = []
    for m in memberships:
        if m.is_admin:
            url = reverse("teams:dashboard", kwargs={"slug": m.team.slug})
        else:
            url = _my_usage_url(m.team.slug)
        rows.append({"team": m.team, "membership": m, "url": url})
    return render(request, "teams/picker.html", {"rows": rows})


@require_GET
@login_required
def dashboard(request: HttpRequest, slug: str) -> HttpResponse:
    """Every capacity-based product of the team as a card; htmx polls the #cards partial."""
    team, membership = get_team_for_user(request, slug)
    now = timezone.now()
    cards = render_cards(team, team_balances(team, now=now))
    context = {"team": team, "membership": membership, "cards": cards, "now": now, "poll_seconds": POLL_SECONDS}
    if request.htmx and request.htmx.target == "cards":
        # The 10-second poll: the card grid only, no writes, a fixed number of queries.
        response = render(request, "teams/dashboard.html#cards", context)
    else:
        # One query gives the team selector and when each of the user's teams was last seen.
        admin_of = list(Membership.objects.filter(user=request.user, role__in=ADMIN_ROLES)
                        .select_related("team").order_by("team__name"))
        context["admin_teams"] = [m.team for m in admin_of]
        if membership_needs_mark(membership, [m.last_seen_at for m in admin_of if m.pk != membership.pk], now):
            membership_mark_seen(membership=membership, now=now)
        response = render(request, "teams/dashboard.html", context)
    # Same URL, two representations: caches must key on the htmx header.
    patch_vary_headers(response, ["HX-Request"])
    return response
