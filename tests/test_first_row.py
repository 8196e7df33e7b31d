"""One statement's first row straight through libpq (capacity_portal.postgresql.first_row):
the values Django's cursor gives, its errors as Django's, its prepared statements kept
right, and Django's cursor wherever the shortcut would change what is seen."""

from __future__ import annotations

import _thread
import threading
import time
import zoneinfo
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from django.db import DatabaseError, DataError, OperationalError, ProgrammingError, connection
from django.test.utils import CaptureQueriesContext
from psycopg import pq

from capacity_portal.postgresql.first_row import UNSUITABLE, first_row
from usage.fastpath import statement_row

from .test_db_health_check import _backend_pid, _terminate

pytestmark = pytest.mark.django_db(transaction=True)

TYPES_SQL = ("SELECT %s::bigint, %s::int * 2, %s::numeric / 4, %s::text || '!', %s::jsonb, NULL::int, %s::bool, "
             "%s::timestamptz + interval '1 hour', %s::date + 1, 'x'::varchar(3), 7::smallint")
TYPES_PARAMS = [2**40, 21, 10, "héllo", '{"a": [1, 2], "b": "ç"}', True,
                datetime(2026, 11, 30, 23, 30, tzinfo=timezone(timedelta(hours=-5))), date(2026, 2, 28)]


@pytest.fixture
def pg(require_postgres):
    connection.ensure_connection()
    yield connection
    connection.close()  # (prepared statements and overrides go with it)


@pytest.fixture
def prepared_pg(pg, monkeypatch):
    """Prepared statements on, whatever DB_PREPARED_STATEMENTS says."""
    monkeypatch.setitem(pg.settings_dict, "OPTIONS", {**pg.settings_dict["OPTIONS"], "prepare_threshold": 5})
    pg.close()
    return pg


def cursor_row(sql, params):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def prepared_names() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'capacity_portal_row_%%'")
        return [name for (name,) in cursor.fetchall()]


def test_gives_the_row_django_s_cursor_gives_values_and_types(pg):
    ours = first_row(pg, TYPES_SQL, TYPES_PARAMS)
    theirs = cursor_row(TYPES_SQL, TYPES_PARAMS)
    assert ours == theirs
    assert [type(v) for v in ours] == [type(v) for v in theirs]
    assert ours[:5] == (2**40, 42, Decimal("2.5"), "héllo!", '{"a": [1, 2], "b": "ç"}')  # jsonb as text
    assert ours[5] is None and ours[6] is True
    assert ours[7] == datetime(2026, 12, 1, 5, 30, tzinfo=UTC)
    assert ours[8:] == (date(2026, 3, 1), "x", 7)


def test_no_row_is_none_as_fetchone_gives(pg):
    assert first_row(pg, "SELECT 1 WHERE %s::int = 2", [1]) is None
    assert statement_row("SELECT 1 WHERE %s::int = 2", [1]) is None


def test_a_statement_s_error_is_django_s_with_the_psycopg_error_as_its_cause(pg):
    sql = "SELECT CASE WHEN %s::int > 0 THEN (SELECT 1/0) ELSE 1 END"
    with pytest.raises(DataError) as caught:
        first_row(pg, sql, [1])
    assert caught.value.__cause__.sqlstate == "22012"
    assert caught.value.__cause__.diag.message_primary == "division by zero"
    with pytest.raises(DataError):  # the same kind as through Django's cursor
        cursor_row(sql, [1])
    assert not pg.errors_occurred  # (Django: a data error leaves the connection usable)
    assert first_row(pg, sql, [0]) == (1,)  # and the connection goes on (autocommit: nothing left open)


def test_a_raised_sqlstate_reaches_the_caller_as_the_consume_reads_it(pg):
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION pg_temp.refuse(n int) RETURNS int LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION '%', n USING ERRCODE = '22X02'; END $$")
    with pytest.raises(DatabaseError) as caught:
        first_row(pg, "SELECT pg_temp.refuse(%s)", [17])
    assert caught.value.__cause__.sqlstate == "22X02"
    assert caught.value.__cause__.diag.message_primary == "17"


@pytest.mark.parametrize("params", [
    ["a\x00b"],  # psycopg refuses a NUL: Django's cursor says so
    [Decimal("1.5")],  # not a kind written here
    [datetime(2026, 1, 1, 12, 0)],  # naive
    [[1, 2]],
])
def test_a_parameter_it_does_not_write_as_psycopg_would_is_left_to_django(pg, params):
    assert first_row(pg, "SELECT %s::text", params) is UNSUITABLE


def test_a_nul_still_fails_as_before_through_statement_row(pg):
    with pytest.raises(DataError):
        statement_row("SELECT %s::text", ["a\x00b"])


def test_logged_queries_and_execute_wrappers_see_the_statement(pg):
    with CaptureQueriesContext(pg) as captured:
        assert first_row(pg, "SELECT %s::int", [1]) is UNSUITABLE
        assert statement_row("SELECT %s::int + 1", [1]) == (2,)
    assert [q["sql"] for q in captured.captured_queries] == ["SELECT 1::int + 1"]
    seen = []
    with pg.execute_wrapper(lambda execute, sql, params, many, context: seen.append(sql) or execute(
            sql, params, many, context)):
        assert statement_row("SELECT %s::int + 2", [1]) == (3,)
    assert seen == ["SELECT %s::int + 2"]


def test_a_literal_percent_is_left_to_django(pg):
    assert first_row(pg, "SELECT '100%%', %s::int", [1]) is UNSUITABLE
    assert statement_row("SELECT '100%%', %s::int", [1]) == ("100%", 1)


def test_prepared_once_per_connection_and_again_on_a_new_one(prepared_pg):
    pg = prepared_pg
    for n in range(3):
        assert first_row(pg, "SELECT %s::int + 40", [n]) == (40 + n,)
    assert len(prepared_names()) == 1
    pg.close()
    assert first_row(pg, "SELECT %s::int + 40", [2]) == (42,)  # a new connection: prepared there
    assert len(prepared_names()) == 1


def test_prepared_statements_dropped_by_the_server_are_prepared_again(prepared_pg):
    pg = prepared_pg
    assert first_row(pg, "SELECT %s::int + 1", [1]) == (2,)
    pg.connection.execute("DEALLOCATE ALL")  # (what a pooler's DISCARD ALL does)
    assert first_row(pg, "SELECT %s::int + 1", [2]) == (3,)


def test_a_function_replaced_under_its_prepared_statement_is_prepared_again(prepared_pg):
    pg = prepared_pg
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION pg_temp.shape(n int) RETURNS int LANGUAGE sql AS 'SELECT n'")
    assert first_row(pg, "SELECT * FROM pg_temp.shape(%s)", [5]) == (5,)
    with connection.cursor() as cursor:  # a migration replacing it with another result type
        cursor.execute("DROP FUNCTION pg_temp.shape(int)")
        cursor.execute("CREATE FUNCTION pg_temp.shape(n int) RETURNS TABLE (a int, b text) LANGUAGE sql "
                       "AS 'SELECT n, n::text'")
    assert first_row(pg, "SELECT * FROM pg_temp.shape(%s)", [6]) == (6, "6")


def test_without_prepared_statements_nothing_is_left_on_the_server(pg, monkeypatch):
    options = {k: v for k, v in pg.settings_dict["OPTIONS"].items()
               if k not in ("prepare_threshold", "server_side_binding")}  # DB_PREPARED_STATEMENTS=0
    monkeypatch.setitem(pg.settings_dict, "OPTIONS", options)
    pg.close()
    assert first_row(pg, "SELECT %s::int * 3", [3]) == (9,)
    assert first_row(pg, "SELECT %s::int * 3", [4]) == (12,)
    assert prepared_names() == []


def test_a_terminated_backend_is_replaced_by_the_request_s_health_check(pg):
    assert first_row(pg, "SELECT %s::int", [1]) == (1,)
    pid = _backend_pid()
    _terminate(pid)
    time.sleep(0.1)  # the server's goodbye reaches the socket
    pg.health_check_enabled, pg.health_check_done = True, False  # (a new request)
    assert first_row(pg, "SELECT %s::int", [2]) == (2,)
    assert _backend_pid() != pid


def test_a_connection_in_another_time_zone_than_its_loaders_is_left_to_django(pg):
    pg.__dict__["timezone"] = zoneinfo.ZoneInfo("Europe/Paris")  # (Django's cursor would load in it)
    try:
        assert first_row(pg, "SELECT %s::int", [1]) is UNSUITABLE
    finally:
        del pg.__dict__["timezone"]


def test_an_error_that_may_break_the_connection_marks_it_for_a_look(pg):
    with pytest.raises(ProgrammingError):
        first_row(pg, "SELECT no_such_function(%s::int)", [1])
    assert pg.errors_occurred  # (looked at when the request ends, as after Django's cursor)


def test_a_function_raising_feature_not_supported_runs_once(prepared_pg):
    pg = prepared_pg
    with connection.cursor() as cursor:  # (a sequence counts the calls: nextval is not rolled back)
        cursor.execute("CREATE TEMP SEQUENCE calls")
        cursor.execute("CREATE FUNCTION pg_temp.unsupported(n int) RETURNS int LANGUAGE plpgsql AS "
                       "$$ BEGIN PERFORM nextval('calls'); RAISE EXCEPTION 'no' USING ERRCODE = '0A000'; END $$")
    with pytest.raises(DatabaseError) as caught:
        first_row(pg, "SELECT pg_temp.unsupported(%s)", [1])
    assert caught.value.__cause__.sqlstate == "0A000"
    assert cursor_row("SELECT last_value FROM calls", []) == (1,)  # not run again as a stale plan would be
    assert len(prepared_names()) == 1


def test_an_interrupt_during_the_wait_cancels_the_statement_and_leaves_the_connection_usable(pg):
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE first_row_interrupt (n int)")
    try:
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            first_row(pg, "WITH i AS (INSERT INTO first_row_interrupt VALUES (%s::int) RETURNING n) "
                          "SELECT i.n FROM i, pg_sleep(3)", [1])
        timer.join()
        assert pg.connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
        assert first_row(pg, "SELECT count(*) FROM first_row_interrupt WHERE n = %s::int", [1]) == (0,)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE first_row_interrupt")


def test_a_backend_terminated_mid_statement_is_an_operational_error_and_the_connection_goes(pg):
    pid = _backend_pid()
    killer = threading.Timer(0.3, _terminate, [pid])
    killer.start()
    with pytest.raises(OperationalError):
        first_row(pg, "SELECT pg_sleep(3), %s::int", [1])
    killer.join()
    assert pg.errors_occurred
    pg.close_if_unusable_or_obsolete()  # (what the request's end does)
    assert pg.connection is None
