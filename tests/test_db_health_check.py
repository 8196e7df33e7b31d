"""The PostgreSQL backend's health check: no round trip while the connection is
healthy, and a terminated backend is noticed before the request's first query."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pg(require_postgres):
    connection.ensure_connection()
    return connection


def _terminate(pid: int) -> None:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("server_side_binding", None)
    with psycopg.connect(**params, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        for _ in range(100):
            if admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone() is None:
                return
            time.sleep(0.05)
    raise AssertionError("the backend did not go away")


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_a_healthy_idle_connection_is_usable_without_a_query(pg, monkeypatch):
    _backend_pid()
    raw = pg.connection

    def no_query(*args, **kwargs):
        raise AssertionError("the health check sent a query")

    monkeypatch.setattr(raw, "cursor", no_query)
    assert pg.is_usable() is True


def test_a_terminated_backend_is_unusable_and_replaced_before_the_first_query(pg):
    pid = _backend_pid()
    _terminate(pid)
    time.sleep(0.1)  # the server's goodbye reaches the socket
    assert pg.is_usable() is False
    # What Django does before a request's first query with CONN_HEALTH_CHECKS on:
    pg.health_check_enabled, pg.health_check_done = True, False
    pg.close_if_health_check_failed()
    assert _backend_pid() != pid  # a new connection, and the query worked


def test_not_idle_falls_back_to_a_real_query(pg):
    pg.connection.execute("BEGIN")
    try:
        assert pg.is_usable() is True  # SELECT 1 inside the open transaction
        with pytest.raises(psycopg.Error):
            pg.connection.execute("SELECT 1/0")
        assert pg.is_usable() is False  # an aborted transaction cannot run SELECT 1
    finally:
        pg.connection.execute("ROLLBACK")
