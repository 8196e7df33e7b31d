"""``DATABASE_URL``: the PostgreSQL host as written, including a Unix socket's directory."""

from __future__ import annotations

import os

import psycopg
import pytest
from django.db import connection

from capacity_portal.settings import database_from_url


@pytest.mark.parametrize(("url", "host", "port"), [
    ("postgres://u:p@127.0.0.1:5432/app", "127.0.0.1", "5432"),
    ("postgres://u@db.Example.internal/app", "db.Example.internal", ""),
    ("postgresql://u@[::1]:6543/app", "::1", "6543"),
    ("postgres://u@%2Fvar%2Frun%2Fpostgresql/app", "/var/run/postgresql", ""),
    ("postgres://u@%2Fsrv%2FPG%20Sockets:5433/app", "/srv/PG Sockets", "5433"),
    ("postgres:///app", "", ""),
])
def test_host_is_kept_as_written(url, host, port):
    settings = database_from_url(url)
    assert (settings["HOST"], settings["PORT"], settings["NAME"]) == (host, port, "app")


def test_host_in_the_query_is_a_connection_option():
    settings = database_from_url("postgres://u@/app?host=/var/run/postgresql")
    assert settings["HOST"] == "" and settings["OPTIONS"]["host"] == "/var/run/postgresql"


def test_a_socket_url_connects(require_postgres):
    """The server this suite runs on, reached through its socket directory."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT setting FROM pg_settings WHERE name = 'unix_socket_directories'")
        directory = cursor.fetchone()[0].split(",")[0].strip()
    if not directory or not os.path.isdir(directory):
        pytest.fail(f"the server under test has no socket directory here ({directory!r})")
    params = connection.get_connection_params()
    url = f"postgres://{params['user']}@{directory.replace('/', '%2F')}:{params.get('port') or 5432}/{params['dbname']}"
    settings = database_from_url(url)
    with psycopg.connect(host=settings["HOST"], port=settings["PORT"], user=settings["USER"],
                         dbname=settings["NAME"]) as conn:
        assert conn.info.host == directory
        assert conn.execute("SELECT current_database()").fetchone()[0] == params["dbname"]
