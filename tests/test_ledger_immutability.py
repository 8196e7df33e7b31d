"""Ledger rows are append-only: model, queryset, admin and PostgreSQL refuse changes."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from usage.models import LedgerEntry, LedgerImmutableError

from .factories import make_grant

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry(world):
    make_grant(world["team"], world["tokens"], 10)
    return LedgerEntry.objects.get()


def test_model_refuses_update_and_delete(entry):
    entry.delta = 999
    with pytest.raises(LedgerImmutableError):
        entry.save()
    with pytest.raises(LedgerImmutableError):
        entry.delete()
    with pytest.raises(LedgerImmutableError):
        LedgerEntry.objects.filter(pk=entry.pk).update(delta=1)
    with pytest.raises(LedgerImmutableError):
        LedgerEntry.objects.all().delete()
    assert LedgerEntry.objects.get().delta == 10


def test_postgres_trigger_refuses_update_delete_truncate(entry, require_postgres):
    table = LedgerEntry._meta.db_table
    for sql in (f"UPDATE {table} SET delta = 0", f"DELETE FROM {table}", f"TRUNCATE {table} CASCADE"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
            # The test database allows purges between tests; production sessions never do.
            cur.execute("SET LOCAL capacity_portal.ledger_purge = 'off'")
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # TRUNCATE refuses pending FK checks
            cur.execute(sql)
    # Even with the purge switch on, UPDATE stays refused.
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"UPDATE {table} SET delta = 0")
    assert LedgerEntry.objects.get().delta == 10


def test_admin_is_read_only(entry, admin_client):
    url = f"/admin/usage/ledgerentry/{entry.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200
    assert b'name="delta"' not in page.content  # shown, not editable
    assert admin_client.post(url, {"delta": 5}).status_code == 403
    assert admin_client.get("/admin/usage/ledgerentry/add/").status_code == 403
    assert admin_client.post(f"/admin/usage/ledgerentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    listing = admin_client.get("/admin/usage/ledgerentry/?kind=grant")
    assert listing.status_code == 200
    assert LedgerEntry.objects.get().delta == 10
