"""The project's indexes: none that another index already covers, and every foreign key
still leads an index (deleting a team, product or user checks the rows that refer to it),
over all rows or, for a mostly-empty one, over the rows where it is set.

Each index is written on every insert (and on every update that is not HOT): a redundant
one slows every ledger, event and rollup write and buys no read.
"""

from __future__ import annotations

import pytest
from django.db import connection

pytestmark = pytest.mark.usefixtures("require_postgres")

APP_TABLES = r"^(teams|products|usage)_"

# Indexes of one table: (name, unique, predicate or None, key columns, operator classes).
INDEXES_SQL = """
SELECT c.relname, ic.relname, i.indisunique, pg_get_expr(i.indpred, i.indrelid),
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
       i.indclass::oid[]
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relname ~ %s
"""

FOREIGN_KEYS_SQL = """
SELECT c.relname, con.conname, a.attname
  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
 WHERE con.contype = 'f' AND n.nspname = current_schema() AND c.relname ~ %s
"""


def _indexes() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(INDEXES_SQL, [APP_TABLES])
        return cursor.fetchall()


def test_no_index_is_covered_by_another():
    indexes = _indexes()
    assert len(indexes) > 30  # (the query sees the project's tables)
    covered = []
    for table, name, unique, partial, keys, classes in indexes:
        if unique or partial:
            continue  # a constraint, or an index of some rows: not a plain duplicate
        n = len(keys)
        for other_table, other, _, other_partial, other_keys, other_classes in indexes:
            if (other_table == table and other != name and not other_partial and len(other_keys) >= n
                    and other_keys[:n] == keys and list(other_classes[:n]) == list(classes)):
                covered.append(f"{table}.{name} {keys} is covered by {other} {other_keys}")
    assert covered == []


def test_every_foreign_key_leads_an_index():
    # An index of the rows where the column is set serves a foreign key check (col = x) as well.
    leading = {(table, keys[0]) for table, _, _, predicate, keys, _ in _indexes()
               if predicate is None or predicate == f"({keys[0]} IS NOT NULL)"}
    with connection.cursor() as cursor:
        cursor.execute(FOREIGN_KEYS_SQL, [APP_TABLES])
        foreign_keys = cursor.fetchall()
    assert len(foreign_keys) > 30
    unindexed = [f"{table}.{column} ({name})" for table, name, column in foreign_keys
                 if (table, column) not in leading]
    assert unindexed == []


def test_the_ledger_writes_no_team_index_of_its_own():
    """The hot tables' team column is led by their composite indexes only."""
    by_table: dict[str, list] = {}
    for table, _, _, _, keys, _ in _indexes():
        by_table.setdefault(table, []).append(keys)
    for table in ("usage_ledgerentry", "usage_event", "usage_dailyrollup", "usage_dailybreakdown"):
        assert ["team_id"] not in by_table[table]
        assert any(keys[0] == "team_id" and len(keys) > 1 for keys in by_table[table])


WHERE_SET = {
    ("usage_event", "event_actor_user_set", "actor_user_id"),
    ("usage_ledgerentry", "ledger_actor_user_set", "actor_user_id"),
    ("usage_ledgerentry", "ledger_member_set", "member_id"),
    ("usage_ledgerentry", "ledger_checkout_set", "checkout_id"),
}


def test_mostly_empty_foreign_keys_are_indexed_where_set():
    """The API's rows leave these empty: they write no index entry (usage.0011), and a
    delete's check of the foreign key finds the rows that are set by that index."""
    found = {(table, name, keys[0]) for table, name, _, predicate, keys, _ in _indexes()
             if predicate == f"({keys[0]} IS NOT NULL)"}
    assert WHERE_SET <= found
    whole = {(table, keys[0]) for table, _, _, predicate, keys, _ in _indexes() if predicate is None}
    assert not {(table, column) for table, _, column in WHERE_SET} & whole  # the full ones are gone
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # (the test tables are small)
        try:
            for table, name, column in WHERE_SET:
                cursor.execute(f"EXPLAIN SELECT 1 FROM {table} WHERE {column} = 1")  # noqa: S608 - fixed names
                plan = "\n".join(row[0] for row in cursor.fetchall())
                assert name in plan, plan
        finally:
            cursor.execute("RESET enable_seqscan")


@pytest.mark.django_db(transaction=True)  # (CREATE INDEX CONCURRENTLY runs outside a transaction)
def test_an_index_left_invalid_by_an_interrupted_build_is_built_again():
    """A cancelled ``CREATE INDEX CONCURRENTLY`` leaves an invalid index that ``IF NOT EXISTS``
    would take for a built one: running the swap again drops and rebuilds it, and the index
    it replaces is dropped only once the new one is valid."""
    from django.apps import apps

    from capacity_portal.migration_ops import _index_valid, _swap_index

    def valid(name):
        with connection.schema_editor(atomic=False) as editor:
            return _index_valid(editor, name)

    with connection.cursor() as cursor:  # (as the cancelled build leaves it; the test runs as a superuser)
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ledger_member_set'::regclass")
    assert valid("ledger_member_set") is False
    with connection.schema_editor(atomic=False) as editor:
        _swap_index(apps, editor, "usage", "ledgerentry", "member", "ledger_member_set", where_set=True)
    assert valid("ledger_member_set") is True
    assert valid("usage_ledgerentry_member_id_e69acf8a") is None  # Django's whole index: still gone
