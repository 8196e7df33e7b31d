"""Periodic tasks (eager, on_commit executed): refresh/expiry, rollups, pruning, schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from capacity_portal.celery import app
from products.models import Lot, Refresh, TeamProduct
from products.selectors import product_balance
from usage import periodic, tasks
from usage.models import DailyBreakdown, DailyRollup, Drift, Event, Kind, LedgerEntry
from usage.services import job_refund, usage_consume

from .conftest import key
from .factories import make_grant

pytestmark = pytest.mark.django_db


def ledger_snapshot():
    return list(LedgerEntry.objects.order_by("id").values_list("kind", "delta", "lot_id", "grant_id", "occurred_at"))


def monthly_grant_40_days_old(world, quantity=100):
    """A monthly grant whose first period ended 10 days ago; no task has run since."""
    now = timezone.now()
    starts = now - timedelta(days=40)
    grant = make_grant(world["team"], world["tokens"], quantity, refresh=Refresh.MONTHLY, starts_at=starts,
                       ends_at=starts + timedelta(days=365), now=starts + timedelta(hours=1))
    return grant


def test_monthly_refresh_writes_expire_and_refresh_rows_once(world, django_capture_on_commit_callbacks):
    grant = monthly_grant_40_days_old(world)
    tp = TeamProduct.objects.get(team=world["team"], product=world["tokens"])
    assert periodic.balances_due_for_refresh(now=timezone.now()) == [tp.pk]

    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.balances_refresh_due.delay().get() == 1

    kinds = list(LedgerEntry.objects.filter(grant=grant).order_by("id").values_list("kind", "delta"))
    assert kinds == [(Kind.GRANT, 100), (Kind.EXPIRE, -100), (Kind.REFRESH, 100)]  # no rollover
    lots = list(Lot.objects.filter(grant=grant).order_by("period_index"))
    assert [(lot.period_index, lot.remaining, lot.closed_at is not None) for lot in lots] == [
        (0, 0, True), (1, 100, False)]

    before = ledger_snapshot()
    with django_capture_on_commit_callbacks(execute=True):
        tasks.balances_refresh_due.delay()
        tasks.balance_refresh.delay(tp.pk)
    assert ledger_snapshot() == before


def test_refresh_keeps_the_balance_the_reader_already_saw(world):
    """Correct at read time: the task materialises what the selector already showed."""
    monthly_grant_40_days_old(world)
    seen = product_balance(world["team"], world["tokens"])
    result = periodic.balance_refresh(team_product_id=TeamProduct.objects.get().pk)
    assert (result.expired, result.refreshed) == (1, 1)
    after = product_balance(world["team"], world["tokens"])
    assert (after.available, after.total) == (seen.available, seen.total) == (100, 100)


def test_expiry_of_an_ended_grant(world, django_capture_on_commit_callbacks):
    now = timezone.now()
    grant = make_grant(world["team"], world["tokens"], 50, starts_at=now - timedelta(days=20),
                       ends_at=now - timedelta(days=1), now=now - timedelta(days=19))
    usage_consume(team=world["team"], product=world["tokens"], quantity=20, idempotency_key=key(),
                  actor=tasks.periodic.PERIODIC_ACTOR, now=now - timedelta(days=5))
    with django_capture_on_commit_callbacks(execute=True):
        tasks.balances_refresh_due.delay()
    expire = LedgerEntry.objects.get(grant=grant, kind=Kind.EXPIRE)
    assert (expire.delta, expire.occurred_at) == (-30, grant.ends_at)
    assert periodic.balances_due_for_refresh(now=timezone.now()) == []


def test_nothing_due_enqueues_nothing(world, django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 10)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert tasks.balances_refresh_due.delay().get() == 0
    assert callbacks == []


def test_enqueue_waits_for_commit_and_drops_on_rollback(world, django_capture_on_commit_callbacks):
    monthly_grant_40_days_old(world)
    tp = TeamProduct.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        try:
            with transaction.atomic():
                tasks.enqueue(tasks.balance_refresh, tp.pk)
                raise RuntimeError("the write rolled back")
        except RuntimeError:
            pass
    assert not LedgerEntry.objects.filter(kind=Kind.REFRESH).exists()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with transaction.atomic():
            tasks.enqueue(tasks.balance_refresh, tp.pk)
            assert not LedgerEntry.objects.filter(kind=Kind.REFRESH).exists()  # not before commit
    assert len(callbacks) == 1
    assert LedgerEntry.objects.filter(kind=Kind.REFRESH).count() == 1


def test_a_deleted_id_is_a_no_op():
    assert periodic.balance_refresh(team_product_id=987654) == periodic.RefreshResult(0, 0)
    assert tasks.rollup_verify.delay(987654, "2026-01-01").get() == 0
    assert tasks.alerts_check_team_product.delay(987654).get() == []


# -- rollups ---------------------------------------------------------------------------


def _used_today(world, quantity=7):
    make_grant(world["team"], world["tokens"], 100)
    usage_consume(team=world["team"], product=world["tokens"], quantity=quantity, idempotency_key=key(),
                  actor=periodic.PERIODIC_ACTOR, job_id="job-1")
    return TeamProduct.objects.get(), timezone.localdate(timezone.now(), world["team"].tzinfo)


def test_rollup_verify_finds_nothing_on_a_clean_ledger(world, django_capture_on_commit_callbacks):
    tp, today = _used_today(world)
    job_refund(team=world["team"], job_id="job-1", idempotency_key=key(), actor=periodic.PERIODIC_ACTOR)
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.rollups_verify_recent.delay().get() == 1  # one balance, one local day touched
    assert not Drift.objects.exists()
    assert periodic.rollup_from_ledger(tp, today) == {"consumed": 7, "refunded": 7, "checked_out": 0, "returned": 0}


def test_rollup_drift_is_logged_fixed_and_recorded_once(world, caplog):
    tp, today = _used_today(world)
    DailyRollup.objects.filter(team=world["team"], day=today).update(consumed=999)
    with caplog.at_level(logging.ERROR, logger="usage.periodic"):
        drift = periodic.rollup_verify(team_product_id=tp.pk, first_day=today)
    assert drift == [{"day": today, "scope": "day", "expected": {"consumed": 7, "refunded": 0, "checked_out": 0, "returned": 0},
                      "actual": {"consumed": 999, "refunded": 0, "checked_out": 0, "returned": 0}}]
    assert "rollup drift" in caplog.text
    assert DailyRollup.objects.get(team=world["team"], day=today).consumed == 7
    d = Drift.objects.get()
    assert (d.kind, d.fixed, d.day) == (Drift.Kind.ROLLUP, True, today)
    assert periodic.rollup_verify(team_product_id=tp.pk, first_day=today) == []  # rerun: nothing left
    assert Drift.objects.count() == 1


def test_back_dated_usage_gets_its_day_verified(world, django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 100, days=400, starts_at=timezone.now() - timedelta(days=30))
    ten_days_ago = timezone.now() - timedelta(days=10)
    usage_consume(team=world["team"], product=world["tokens"], quantity=4, idempotency_key=key(),
                  actor=periodic.PERIODIC_ACTOR, occurred_at=ten_days_ago)
    day = timezone.localdate(ten_days_ago, world["team"].tzinfo)
    tp = TeamProduct.objects.get()
    assert periodic.rollups_recent_units(now=timezone.now()) == [(tp.pk, day, day)]
    DailyRollup.objects.filter(day=day).update(consumed=0)
    with django_capture_on_commit_callbacks(execute=True):
        tasks.rollups_verify_recent.delay()
    assert DailyRollup.objects.get(day=day).consumed == 4
    assert Drift.objects.get().day == day
    # Rows recorded long ago are not re-verified every hour.
    assert periodic.rollups_recent_units(now=timezone.now() + timedelta(hours=3)) == []


def test_rollup_catch_up_creates_a_missing_day(world):
    tp, today = _used_today(world, quantity=3)
    DailyRollup.objects.all().delete()
    assert [d["scope"] for d in periodic.rollup_verify(team_product_id=tp.pk, first_day=today)] == ["day"]
    assert DailyRollup.objects.get(team=world["team"], day=today).consumed == 3


def test_breakdown_drift_is_fixed_per_service_and_user(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100)
    for service, user, quantity in [("rendering", "a@x.io", 5), ("rendering", "b@x.io", 2), ("analysis", "", 1)]:
        usage_consume(team=team, product=tokens, quantity=quantity, idempotency_key=key(),
                      actor=periodic.PERIODIC_ACTOR, service=service, user=user)
    tp, today = TeamProduct.objects.get(), timezone.localdate(timezone.now(), team.tzinfo)
    assert periodic.rollup_verify(team_product_id=tp.pk, first_day=today) == []
    DailyBreakdown.objects.filter(service="rendering", user="b@x.io").update(consumed=20)
    DailyBreakdown.objects.filter(service="analysis").delete()
    DailyBreakdown.objects.create(team=team, product=tokens, day=today, service="ghost", user="", consumed=9)
    found = periodic.rollup_verify(team_product_id=tp.pk, first_day=today)
    assert [d["scope"] for d in found] == ["service='analysis' user=''", "service='ghost' user=''",
                                          "service='rendering' user='b@x.io'"]
    rows = {(b.service, b.user): b.consumed for b in DailyBreakdown.objects.filter(day=today)}
    assert rows == {("rendering", "a@x.io"): 5, ("rendering", "b@x.io"): 2, ("analysis", ""): 1, ("ghost", ""): 0}
    assert Drift.objects.count() == 3
    assert periodic.rollup_verify(team_product_id=tp.pk, first_day=today) == []


# -- idempotency records -----------------------------------------------------------------


def test_events_prune_keeps_the_ledger_intact(world):
    tp, _ = _used_today(world)
    used = Event.objects.get(operation="consume")
    orphan_old = Event.objects.create(team=world["team"], key="old", fingerprint="x", operation="metered")
    orphan_new = Event.objects.create(team=world["team"], key="new", fingerprint="x", operation="metered")
    long_ago = timezone.now() - timedelta(days=settings.IDEMPOTENCY_RETENTION_DAYS + 1)
    Event.objects.filter(pk__in=[used.pk, orphan_old.pk]).update(created_at=long_ago)
    before = ledger_snapshot()

    assert tasks.events_prune.delay().get() == 1
    assert set(Event.objects.values_list("pk", flat=True)) == {used.pk, orphan_new.pk}
    assert ledger_snapshot() == before
    assert periodic.events_prune() == 0  # twice: nothing more


# -- schedule and the embedded runner ---------------------------------------------------


def test_every_beat_entry_names_a_registered_task():
    app.loader.import_default_modules()
    assert settings.CELERY_BEAT_SCHEDULE
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert entry["task"] in app.tasks, name


def test_celery_reliability_settings():
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_run_periodic_once_does_the_work_in_process(world, django_capture_on_commit_callbacks, capsys):
    grant = monthly_grant_40_days_old(world)
    with django_capture_on_commit_callbacks(execute=True):
        call_command("run_periodic", "--once")
    assert "ran 8 periodic jobs" in capsys.readouterr().out
    assert LedgerEntry.objects.filter(grant=grant, kind=Kind.REFRESH).count() == 1


def test_periodic_runner_runs_each_job_only_when_due():
    from usage.management.commands.run_periodic import PeriodicRunner

    runner = PeriodicRunner({"a": {"task": "usage.events_prune", "schedule": 3600},
                             "b": {"task": "usage.events_prune", "schedule": timedelta(seconds=1)}})
    assert runner.due() == ["a", "b"]
    runner.last_run = dict.fromkeys(runner.entries, timezone.now() - timedelta(seconds=5))
    assert runner.due() == ["b"]


def test_make_run_server_does_the_periodic_work_without_redis(tmp_path):
    """`make run` = runserver_with_periodic: pages are served and due refreshes get written, no Redis."""
    import os
    import socket
    import sqlite3
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    db = tmp_path / "run.sqlite3"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTEST_VERSION", "REDIS_URL", "DATABASE_URL"}}
    env["DATABASE_URL"] = f"sqlite:///{db}"
    manage = [sys.executable, "manage.py"]
    setup = (
        "from django.core.management import call_command; call_command('migrate', verbosity=0); "
        "from datetime import timedelta; from django.utils import timezone; "
        "from products.models import Refresh; from tests.factories import ProductFactory, TeamFactory, make_grant; "
        "s = timezone.now() - timedelta(days=40); "
        "make_grant(TeamFactory(slug='acme'), ProductFactory(code='cloud-tokens'), 100, refresh=Refresh.MONTHLY, "
        "starts_at=s, ends_at=s + timedelta(days=365), now=s + timedelta(hours=1))"
    )
    subprocess.run([*manage, "shell", "-c", setup], cwd=root, env=env, check=True, timeout=120)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([*manage, "runserver_with_periodic", f"127.0.0.1:{port}", "--interval", "1"],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        kinds: list = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sqlite3.connect(db) as conn:
                kinds = [k for (k,) in conn.execute("SELECT kind FROM usage_ledgerentry ORDER BY id")]
            if "refresh" in kinds:
                break
            time.sleep(0.5)
        assert kinds == ["grant", "expire", "refresh"]
        # The jobs can finish before the server listens (its start-up checks run first on a
        # busy machine): give it until the deadline to answer.
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
                    assert response.status == 200
                break
            except urllib.error.URLError as exc:  # urlopen wraps the refused connection
                if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert "Periodic jobs running in-process" in output


def test_rollups_are_verified_over_a_range_in_team_time(world):
    """Local days, not UTC days: rows at 23:30 and 00:30 Auckland time land on two days."""
    from zoneinfo import ZoneInfo

    team, tokens = world["team"], world["tokens"]
    team.timezone = "Pacific/Auckland"
    team.save()
    team.refresh_from_db()
    tz = ZoneInfo("Pacific/Auckland")
    now = timezone.now()
    make_grant(team, tokens, 1000, starts_at=now - timedelta(days=30), days=400)
    local = now.astimezone(tz).replace(hour=23, minute=30, second=0, microsecond=0) - timedelta(days=3)
    for at, quantity in [(local, 5), (local + timedelta(hours=1), 7), (local + timedelta(days=2), 1)]:
        usage_consume(team=team, product=tokens, quantity=quantity, idempotency_key=key(),
                      actor=periodic.PERIODIC_ACTOR, occurred_at=at)
    tp = TeamProduct.objects.get()
    (unit,) = periodic.rollups_recent_units(now=timezone.now())
    first, last = local.date(), (local + timedelta(days=2)).date()
    assert unit == (tp.pk, first, last)
    assert periodic.rollup_verify(team_product_id=tp.pk, first_day=first, last_day=last) == []
    days, _ = periodic.rollups_from_ledger(tp, first, last)
    assert {d: a["consumed"] for d, a in days.items()} == {first: 5, first + timedelta(days=1): 7, last: 1}
    DailyRollup.objects.filter(day=first + timedelta(days=1)).update(consumed=12)
    found = periodic.rollup_verify(team_product_id=tp.pk, first_day=first, last_day=last)
    assert [(d["day"], d["scope"]) for d in found] == [(first + timedelta(days=1), "day")]
