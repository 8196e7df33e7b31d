"""The dashboard's query count does not grow with the number of products (issue 7).

Not timed: counts every query of the full page and of the htmx card partial (session
and user included) for a team with 5 products and a team with 50, with a mix of
grant kinds (never / monthly, exhaustible / returnable, a second grant on some).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from products.models import CapacityType, Refresh, Source
from teams.models import Role

from .factories import MembershipFactory, ProductFactory, TeamFactory, UserFactory, make_grant

MAX_QUERIES = 10
PARTIAL = {"HX-Request": "true", "HX-Target": "cards"}


def team_with_products(n: int, slug: str):
    team = TeamFactory(slug=slug, timezone="America/New_York")
    user = UserFactory(username=f"admin-{slug}")
    MembershipFactory(team=team, user=user, role=Role.PRIMARY_ADMIN)
    now = timezone.now()
    for i in range(n):
        returnable = i % 5 == 4
        product = ProductFactory(
            code=f"qc-{i:02d}", capacity_type=CapacityType.RETURNABLE if returnable else CapacityType.EXHAUSTIBLE,
        )
        make_grant(team, product, 1000 + i, refresh=Refresh.MONTHLY if i % 3 == 1 else Refresh.NEVER,
                   starts_at=now - timedelta(days=40), days=400, now=now)
        if i % 4 == 0:
            make_grant(team, product, 50, source=Source.FREE_TIER, now=now)
    return team, user


def count(client, user, path, headers=None) -> tuple[int, str]:
    client.force_login(user)
    client.get(path, headers=headers or {})  # first view may write (last team seen); count the steady state
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(path, headers=headers or {})
    assert response.status_code == 200
    return len(ctx.captured_queries), response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("headers", [None, PARTIAL], ids=["page", "partial"])
def test_dashboard_queries_do_not_grow_with_products(client, headers):
    small, small_admin = team_with_products(5, "five")
    big, big_admin = team_with_products(50, "fifty")

    n5, html5 = count(client, small_admin, reverse("teams:dashboard", kwargs={"slug": small.slug}), headers)
    n50, html50 = count(client, big_admin, reverse("teams:dashboard", kwargs={"slug": big.slug}), headers)

    # The measured pages really show every product's card.
    assert html5.count("data-product=") == 5
    assert html50.count("data-product=") == 50
    assert n5 == n50, f"5 products: {n5} queries, 50 products: {n50}"
    assert n50 <= MAX_QUERIES
