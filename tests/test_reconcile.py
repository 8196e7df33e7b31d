"""Reconciliation: every lot, quantity + sum(deltas) == remaining; drift is loud and visible to staff."""

from __future__ import annotations

import logging

import pytest
from django.urls import reverse

from products.models import Lot, TeamProduct
from usage import periodic, tasks
from usage.models import Drift, ReconciliationCheck, ReconciliationRun
from usage.services import job_refund, usage_checkout, usage_consume, usage_return

from .conftest import key
from .factories import UserFactory, make_grant

pytestmark = pytest.mark.django_db
ACTOR = periodic.PERIODIC_ACTOR


def busy_world(world):
    team, tokens, pool = world["team"], world["tokens"], world["pool"]
    make_grant(team, tokens, 100)
    make_grant(team, tokens, 50)
    make_grant(team, pool, 10)
    usage_consume(team=team, product=tokens, quantity=120, idempotency_key=key(), actor=ACTOR, job_id="j1")
    job_refund(team=team, job_id="j1", idempotency_key=key(), actor=ACTOR)
    usage_consume(team=team, product=tokens, quantity=30, idempotency_key=key(), actor=ACTOR)
    usage_checkout(team=team, product=pool, quantity=6, checkout_id="c1", idempotency_key=key(), actor=ACTOR)
    usage_return(team=team, product=pool, quantity=4, checkout_id="c1", idempotency_key=key(), actor=ACTOR)


def test_clean_ledger_reconciles_with_zero_drift(world, django_capture_on_commit_callbacks):
    busy_world(world)
    with django_capture_on_commit_callbacks(execute=True):
        run_id = tasks.ledger_reconcile.delay().get()
    run = ReconciliationRun.objects.get(pk=run_id)
    assert run.balances_expected == 2
    checks = list(run.checks.order_by("team_product_id"))
    assert [(c.lots_checked, c.drift_count) for c in checks] == [(2, 0), (1, 0)]
    assert not Drift.objects.exists()


def test_a_balance_is_checked_once_per_run(world):
    busy_world(world)
    run, ids = periodic.reconciliation_start()
    assert periodic.reconcile_balance(run_id=run.pk, team_product_id=ids[0]) is not None
    assert periodic.reconcile_balance(run_id=run.pk, team_product_id=ids[0]) is None  # claimed already
    assert ReconciliationCheck.objects.filter(run=run).count() == 1


def test_drift_is_logged_as_error_and_recorded(world, caplog):
    busy_world(world)
    lot = Lot.objects.filter(product=world["tokens"]).order_by("pk").first()
    Lot.objects.filter(pk=lot.pk).update(remaining=lot.remaining - 1)  # a write that skipped the ledger
    run, _ = periodic.reconciliation_start()
    tp = TeamProduct.objects.get(product=world["tokens"])
    with caplog.at_level(logging.ERROR, logger="usage.periodic"):
        check = periodic.reconcile_balance(run_id=run.pk, team_product_id=tp.pk)
    assert check.drift_count == 1
    assert "LEDGER DRIFT" in caplog.text and f"lot {lot.pk}" in caplog.text
    drift = Drift.objects.get()
    assert (drift.kind, drift.lot_id, drift.run_id) == (Drift.Kind.LOT, lot.pk, run.pk)
    assert drift.expected["remaining"] == lot.remaining and drift.actual["remaining"] == lot.remaining - 1
    assert Lot.objects.get(pk=lot.pk).remaining == lot.remaining - 1  # lots are never "fixed" silently


def test_staff_see_drift_read_only_in_the_admin(world, client):
    busy_world(world)
    lot = Lot.objects.first()
    Lot.objects.filter(pk=lot.pk).update(remaining=0)
    run, ids = periodic.reconciliation_start()
    for tp_id in ids:
        periodic.reconcile_balance(run_id=run.pk, team_product_id=tp_id)
    staff = UserFactory(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    page = client.get(reverse("admin:usage_drift_changelist"))
    assert page.status_code == 200 and f"{lot.pk}" in page.content.decode()
    drift = Drift.objects.get()
    assert client.get(reverse("admin:usage_drift_add")).status_code == 403
    assert client.post(reverse("admin:usage_drift_delete", args=[drift.pk]), {"post": "yes"}).status_code == 403
    assert Drift.objects.filter(pk=drift.pk).exists()
    runs = client.get(reverse("admin:usage_reconciliationrun_changelist"))
    assert runs.status_code == 200
    assert client.get(reverse("admin:usage_alertstate_changelist")).status_code == 200


def test_non_staff_do_not_see_the_drift_admin(world, client):
    client.force_login(world["members"]["primary_admin"])
    response = client.get(reverse("admin:usage_drift_changelist"))
    assert response.status_code == 302 and "/login/" in response["Location"]
