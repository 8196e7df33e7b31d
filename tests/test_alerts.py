"""Alerts: once per crossing, to the team's admins, again after recovery."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.db import connection, transaction
from django.utils import timezone

from products.models import TeamProduct
from products.services import grant_revoke
from usage import alerts, periodic, tasks
from usage.actors import Actor
from usage.models import AlertState
from usage.services import usage_checkout, usage_consume, usage_return

from .conftest import key
from .factories import make_grant

ACTOR = Actor.system("test")


def consume(world, quantity):
    usage_consume(team=world["team"], product=world["tokens"], quantity=quantity, idempotency_key=key(),
                  actor=ACTOR)


def check(world, product="tokens"):
    tp = TeamProduct.objects.get(team=world["team"], product=world[product])
    return alerts.alerts_check_team_product(team_product_id=tp.pk)


@pytest.fixture(autouse=True)
def portal_url(settings):
    settings.PORTAL_URL = "http://portal.test"


@pytest.mark.django_db
def test_red_once_then_exhausted_once(world):
    make_grant(world["team"], world["tokens"], 100)
    consume(world, 79)
    assert check(world) == [] and mail.outbox == []

    consume(world, 1)  # 20 of 100 left: red (<= 20%)
    assert check(world) == ["low"]
    assert check(world) == []  # same crossing: never twice
    consume(world, 5)
    assert check(world) == []
    assert len(mail.outbox) == 1
    msg = mail.outbox[0]
    assert "Cloud tokens is running low" in msg.subject and "Acme" in msg.subject
    assert "20 of 100 tokens available (20.0%)" in msg.body
    # A link straight to the balance, under the portal's configured address.
    assert f"Balance and usage history: http://portal.test/teams/{world['team'].slug}/products/cloud-tokens/" in msg.body

    consume(world, 15)  # exhausted
    assert check(world) == ["empty"]
    assert check(world) == []
    assert len(mail.outbox) == 2 and "is exhausted" in mail.outbox[1].subject


@pytest.mark.django_db
def test_email_goes_to_the_team_admins_only(world):
    make_grant(world["team"], world["tokens"], 10)
    consume(world, 10)
    check(world)
    m = world["members"]
    assert sorted(mail.outbox[0].to) == sorted(
        [m["primary_admin"].email, m["secondary_admin"].email, m["sso_admin"].email])
    assert m["user"].email not in mail.outbox[0].to and world["outsider"].email not in mail.outbox[0].to


@pytest.mark.django_db
def test_straight_to_empty_sends_one_email_about_both(world):
    make_grant(world["team"], world["tokens"], 10)
    consume(world, 10)
    assert sorted(check(world)) == ["empty", "low"]
    assert len(mail.outbox) == 1 and "is exhausted" in mail.outbox[0].subject
    assert "running low" in mail.outbox[0].body


@pytest.mark.django_db
def test_recovers_and_crosses_again(world):
    """Returnable pool: checkout makes it red, a return recovers it, the next checkout alerts again."""
    make_grant(world["team"], world["pool"], 10)
    usage_checkout(team=world["team"], product=world["pool"], quantity=9, checkout_id="c1",
                   idempotency_key=key(), actor=ACTOR)
    assert check(world, "pool") == ["low"]
    usage_return(team=world["team"], product=world["pool"], quantity=9, checkout_id="c1",
                 idempotency_key=key(), actor=ACTOR)
    assert check(world, "pool") == []
    assert AlertState.objects.get(key="low").active is False
    usage_checkout(team=world["team"], product=world["pool"], quantity=8, checkout_id="c2",
                   idempotency_key=key(), actor=ACTOR)
    assert check(world, "pool") == ["low"]
    assert len(mail.outbox) == 2
    assert AlertState.objects.get(key="low").times_fired == 2


@pytest.mark.django_db
def test_a_top_up_recovers_the_red_state(world):
    make_grant(world["team"], world["tokens"], 100)
    consume(world, 90)
    assert check(world) == ["low"]
    make_grant(world["team"], world["tokens"], 100)  # 110 of 200: green again
    assert check(world) == []
    consume(world, 80)  # 30 of 200: red again
    assert check(world) == ["low"]


@pytest.mark.django_db
def test_team_thresholds_add_alerts(world):
    team = world["team"]
    team.alert_thresholds = [50, 80]
    team.save()
    make_grant(team, world["tokens"], 100)
    consume(world, 49)
    assert check(world) == []
    consume(world, 1)
    assert check(world) == ["used:50"]
    assert "has passed 50% used" in mail.outbox[0].subject
    consume(world, 30)  # 80% used == 20% available: the 80% line and red together
    assert sorted(check(world)) == ["low", "used:80"]
    assert check(world) == []
    assert len(mail.outbox) == 2


@pytest.mark.django_db
def test_grant_ending_in_30_days_is_told_once(world):
    now = timezone.now()
    far = make_grant(world["team"], world["tokens"], 10, starts_at=now - timedelta(days=100),
                     ends_at=now + timedelta(days=60))
    soon = make_grant(world["team"], world["tokens"], 10, starts_at=now - timedelta(days=100),
                      ends_at=now + timedelta(days=30))
    assert check(world) == [f"grant_ending:{soon.pk}"]
    assert check(world) == []
    assert len(mail.outbox) == 1 and "grant ending soon" in mail.outbox[0].subject
    assert "(30 days)" in mail.outbox[0].body
    assert not AlertState.objects.filter(key=f"grant_ending:{far.pk}").exists()


@pytest.mark.django_db
def test_revoked_grant_is_not_told(world):
    now = timezone.now()
    soon = make_grant(world["team"], world["tokens"], 10, ends_at=now + timedelta(days=10))
    grant_revoke(grant=soon)
    make_grant(world["team"], world["tokens"], 10, ends_at=now + timedelta(days=300))
    assert check(world) == []


@pytest.mark.django_db
def test_a_failed_send_is_retried_by_the_next_check(world, settings):
    make_grant(world["team"], world["tokens"], 10)
    consume(world, 9)
    settings.EMAIL_BACKEND = "tests.test_alerts.FailingBackend"
    assert check(world) == []
    assert AlertState.objects.get(key="low").active is False
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert check(world) == ["low"]
    assert len(mail.outbox) == 1


class FailingBackend:
    def __init__(self, *args, **kwargs):
        pass

    def send_messages(self, messages):
        raise ConnectionRefusedError("SMTP is down")


@pytest.mark.django_db
def test_beat_fans_out_over_every_balance(world, django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 10)
    make_grant(world["other"], world["tokens"], 10)
    usage_consume(team=world["other"], product=world["tokens"], quantity=10, idempotency_key=key(), actor=ACTOR)
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.alerts_check_due.delay().get() == 2
    assert len(mail.outbox) == 1 and mail.outbox[0].to == [world["outsider"].email]


@pytest.mark.django_db
def test_the_5_minute_check_looks_only_at_recent_writes(world, django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 10, ends_at=timezone.now() + timedelta(days=20))
    tp = TeamProduct.objects.get()
    assert periodic.balances_touched_since(timezone.now() - timedelta(minutes=10)) == [tp.pk]
    assert periodic.balances_touched_since(timezone.now() + timedelta(minutes=1)) == []
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.alerts_check_all.delay().get() == 1  # the daily sweep: every balance
    assert len(mail.outbox) == 1 and "grant ending soon" in mail.outbox[0].subject


@pytest.mark.django_db(transaction=True)
def test_concurrent_checkers_send_one_email(require_postgres, world):
    make_grant(world["team"], world["tokens"], 10)
    consume(world, 10)
    tp = TeamProduct.objects.get(team=world["team"], product=world["tokens"])
    barrier = threading.Barrier(4)
    results, errors = [], []

    def run():
        try:
            barrier.wait()
            results.append(alerts.alerts_check_team_product(team_product_id=tp.pk))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(k for r in results for k in r) == ["empty", "low"]
    assert len(mail.outbox) == 1


@pytest.mark.django_db
def test_alerts_after_write_checks_on_commit(world, django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 10)
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            consume(world, 9)
            tasks.alerts_after_write(team_id=world["team"].pk, product_id=world["tokens"].pk)
            assert mail.outbox == []  # nothing before the commit
    assert len(mail.outbox) == 1 and "running low" in mail.outbox[0].subject
    assert tasks.alerts_check_balance.delay(world["other"].pk, world["tokens"].pk).get() == []  # never granted


@pytest.mark.django_db
def test_no_link_without_a_portal_address(world, settings):
    settings.PORTAL_URL = ""
    make_grant(world["team"], world["tokens"], 10)
    consume(world, 10)
    check(world)
    body = mail.outbox[0].body
    assert "http" not in body and "Balance and usage history" not in body
    assert "is exhausted" in mail.outbox[0].subject


@pytest.mark.django_db
def test_the_link_keeps_one_path_prefix_inside_a_request(world, settings):
    """Tasks run eagerly inside the request that wrote (no Redis): its script prefix must
    not be added to the one PORTAL_URL already holds."""
    from django.urls import get_script_prefix, set_script_prefix

    settings.PORTAL_URL = "https://example.com/portal"
    before = get_script_prefix()
    set_script_prefix("/portal/")
    try:
        make_grant(world["team"], world["tokens"], 10)
        consume(world, 10)
        check(world)
    finally:
        set_script_prefix(before)
    slug = world["team"].slug
    assert f"https://example.com/portal/teams/{slug}/products/cloud-tokens/\n" in mail.outbox[0].body
