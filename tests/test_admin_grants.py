"""Staff grant capacity in the admin through the grant service."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from products.models import Grant, Lot, Source
from products.selectors import product_balance
from products.services import SUBSCRIPTION_GIFT_TABLE, subscription_gift_plan
from usage.models import Kind, LedgerEntry

from .factories import TeamFactory

pytestmark = pytest.mark.django_db


def test_grant_form_goes_through_the_service(world, admin_client, admin_user):
    team, tokens = world["team"], world["tokens"]
    response = admin_client.post("/admin/products/grant/add/", {
        "team": team.pk, "product": tokens.pk, "quantity": 150, "source": "purchase", "refresh": "never",
        "starts_at": "2026-01-01 00:00", "ends_at": "2099-01-01 00:00", "note": "PO 42",
    })
    assert response.status_code == 302
    grant = Grant.objects.get()
    assert (grant.quantity, grant.created_by, grant.note) == (150, admin_user, "PO 42")
    assert Lot.objects.get(grant=grant).remaining == 150
    row = LedgerEntry.objects.get(kind=Kind.GRANT)
    assert (row.delta, row.grant_id, row.actor_user) == (150, grant.pk, admin_user)


def test_grant_form_rejects_bad_input_without_writing(world, admin_client):
    response = admin_client.post("/admin/products/grant/add/", {
        "team": world["team"].pk, "product": world["tokens"].pk, "quantity": 0, "source": "purchase",
        "refresh": "never", "starts_at": "2026-02-01 00:00", "ends_at": "2026-01-01 00:00",
    })
    assert response.status_code == 200
    assert b"errornote" in response.content or b"errorlist" in response.content
    assert not Grant.objects.exists() and not LedgerEntry.objects.exists()


@pytest.mark.parametrize(("term", "per_licence", "months"), [("annual", 100, 12), ("quarterly", 150, 3),
                                                             ("2_years", 500, 24), ("3_years", 500, 36)])
def test_subscription_gift_table(term, per_licence, months, db):
    team = TeamFactory(timezone="Europe/Berlin")
    start = datetime(2026, 1, 31, 9, 0, tzinfo=UTC)
    plan = subscription_gift_plan(licences=3, term=term, starts_at=start, team=team)
    assert plan.quantity == 3 * per_licence
    assert SUBSCRIPTION_GIFT_TABLE[term][1] == per_licence
    local_end = plan.ends_at.astimezone(team.tzinfo)
    expected_month = (start.month - 1 + months) % 12 + 1
    assert local_end.month == expected_month


def test_gift_form_creates_a_subscription_gift(world, admin_client):
    team, tokens = world["team"], world["tokens"]
    response = admin_client.post("/admin/products/grant/gift/", {
        "team": team.pk, "product": tokens.pk, "licences": 4, "term": "quarterly",
        "starts_at": "2026-01-15 00:00",
    })
    assert response.status_code == 302
    grant = Grant.objects.get()
    assert (grant.quantity, grant.source) == (600, Source.SUBSCRIPTION_GIFT)
    assert grant.ends_at.date().isoformat() == "2026-04-15"


def test_revoke_action(world, admin_client):
    from .factories import make_grant

    team, tokens = world["team"], world["tokens"]
    grant = make_grant(team, tokens, 40)
    response = admin_client.post("/admin/products/grant/", {"action": "revoke_grants", "_selected_action": [grant.pk]})
    assert response.status_code == 302
    grant.refresh_from_db()
    assert grant.revoked_at is not None
    assert LedgerEntry.objects.get(kind=Kind.REVOKE).delta == -40
    assert product_balance(team, tokens).total == 0


def test_grant_change_page_is_read_only(world, admin_client):
    from .factories import make_grant

    grant = make_grant(world["team"], world["tokens"], 40)
    page = admin_client.get(f"/admin/products/grant/{grant.pk}/change/")
    assert page.status_code == 200 and b'name="quantity"' not in page.content
    assert admin_client.post(f"/admin/products/grant/{grant.pk}/delete/", {"post": "yes"}).status_code == 403


def test_admin_pages_render(world, admin_client):
    from .factories import make_grant

    make_grant(world["team"], world["tokens"], 40)
    for url in ["/admin/", "/admin/teams/team/", f"/admin/teams/team/{world['team'].pk}/change/",
                "/admin/products/product/", "/admin/products/grant/", "/admin/products/grant/add/",
                "/admin/products/grant/gift/", "/admin/products/lot/", "/admin/usage/ledgerentry/",
                "/admin/usage/ledgerentry/?kind__exact=grant", "/admin/teams/apikey/add/"]:
        assert admin_client.get(url).status_code == 200, url
