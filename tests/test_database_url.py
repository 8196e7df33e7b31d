"""``DATABASE_URL``: the PostgreSQL host as written, including a Unix socket's directory."""

from __future__ import annotations

import os
from urllib.parse import quote

import pytest
from django.db import connection

from capacity_portal.postgresql.base import DatabaseWrapper
from capacity_portal.settings import database_from_url
from tests.conftest import _skip_or_fail


@pytest.mark.parametrize(("url", "host", "port"), [
    ("postgres://u:p@127.0.0.1:5432/app", "127.0.0.1", "5432"),
    ("postgres://u@db.Example.internal/app", "db.Example.internal", ""),
    ("postgresql://u@[::1]:6543/app", "::1", "6543"),
    ("postgres://u@%2Fvar%2Frun%2Fpostgresql/app", "/var/run/postgresql", ""),
    ("postgres://u@%2Fsrv%2FPG%20Sockets:5433/app", "/srv/PG Sockets", "5433"),
    ("postgres:///app", "", ""),
    ("postgres://u@[fe80::1%25eth0]:5432/app", "fe80::1%eth0", "5432"),
    ("postgres://u:p%40ss%3Aw@db:5432/app", "db", "5432"),
])
def test_host_is_kept_as_written(url, host, port):
    settings = database_from_url(url)
    assert (settings["HOST"], settings["PORT"], settings["NAME"]) == (host, port, "app")


def test_host_in_the_query_is_a_connection_option():
    settings = database_from_url("postgres://u@/app?host=/var/run/postgresql")
    assert settings["HOST"] == "" and settings["OPTIONS"]["host"] == "/var/run/postgresql"


def test_a_socket_url_connects(require_postgres):
    """The server this suite runs on, reached through its socket directory by Django's backend."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT setting FROM pg_settings WHERE name = 'unix_socket_directories'")
        directory = cursor.fetchone()[0].split(",")[0].strip()
    if not directory or not os.path.isdir(directory):  # a server on another host
        _skip_or_fail(f"needs PostgreSQL on this machine: no socket directory {directory!r} here")
    params = connection.settings_dict
    settings = database_from_url(f"postgres://{quote(params['USER'], safe='')}@{quote(directory, safe='')}"
                                 f":{params['PORT'] or 5432}/{quote(params['NAME'], safe='')}")
    assert settings["HOST"] == directory
    wrapper = DatabaseWrapper({**params, "HOST": settings["HOST"], "PORT": settings["PORT"]}, alias="socket")
    try:
        wrapper.ensure_connection()
        assert wrapper.connection.info.host == directory
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            assert cursor.fetchone()[0] == params["NAME"]
    finally:
        wrapper.close()
