"""One statement's first row straight through libpq, for the consume's hot path.

``usage.fastpath.statement_row`` runs the one-statement consume (``usage_consume_api``) on
every API consume. Through Django's cursor that is a cursor wrapper, a psycopg cursor, the
query's conversion and each parameter's adaptation: the Python that psycopg and Django
spend around the round trip, not the round trip. Here the same statement goes through the
connection's libpq handle (``pgconn``) directly: its parameters as text, the statement
prepared once per connection (as psycopg prepares it after ``prepare_threshold`` runs), the
row loaded by the connection's own loaders (so the values are of the types Django's cursor
gives: ``jsonb`` as text, ``numeric`` as Decimal, ``timestamptz`` in the connection's time
zone). With the lane's own trims: consume +5% to +12% in paired runs of ``make bench``'s
loads (``bench/NOTES.md``, session 19).

What it keeps of Django's cursor: the request's connection health check, the connection
opened on demand, the errors as Django's (``DatabaseError`` and its kinds, the psycopg error
as ``__cause__`` with its ``sqlstate`` and ``diag``, ``errors_occurred`` set so the
connection is looked at when the request ends).

The parameters go untyped (as psycopg's text strings do), so the statement must fix each
placeholder's type, by a cast or a function's argument: the consume's statements call a
function of one signature. (``SELECT %s`` with an int would come back as text here.)

It steps aside (returns :data:`UNSUITABLE`, and the caller uses Django's cursor) when its
shortcut would change what is seen: queries being logged (``DEBUG``, a test capturing
them), execute wrappers installed, or a parameter of a kind it does not write the way psycopg
would (anything but None, str, int, bool, an aware datetime and a date; a str holding a NUL,
which psycopg refuses), or a connection whose time zone differs from its loaders' (Django's
cursor then loads timestamps in the connection's). The caller decides when a statement may
run on its own (autocommit, outside a transaction).
"""

from __future__ import annotations

import itertools
from datetime import date, datetime

from psycopg import adapters, errors, generators, pq

UNSUITABLE = object()
_TIMESTAMPTZ = adapters.types["timestamptz"].oid

_texts: dict[str, bytes] = {}


class _Prepared:
    """What one psycopg connection holds: its prepared statements' names, its loaders."""

    def __init__(self):  # (kept on the psycopg connection itself: it goes with it)
        self.names: dict[bytes, bytes] = {}
        self.loaders: dict[int, object] = {}
        self._numbers = itertools.count(1)  # (per connection: no state shared between threads)

    def new_name(self) -> bytes:
        return f"capacity_portal_row_{next(self._numbers)}".encode()

    def loader(self, conn, oid: int):
        loader = self.loaders.get(oid)
        if loader is None:
            cls = conn.adapters.get_loader(oid, pq.Format.TEXT) or conn.adapters.get_loader(0, pq.Format.TEXT)
            loader = self.loaders[oid] = cls(oid, conn)
        return loader


def _param(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL")
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime")
        return value.isoformat().encode()
    if isinstance(value, date):
        return value.isoformat().encode()
    raise ValueError(type(value).__name__)


def _text(sql: str) -> bytes:
    """``sql`` with its ``%s`` placeholders numbered ($1, $2, ...), as bytes."""
    text = _texts.get(sql)
    if text is None:
        parts = sql.split("%s")
        if any("%" in part for part in parts):  # a literal % (%%) or a named placeholder: not ours
            raise ValueError("placeholders")
        numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        text = _texts[sql] = numbered.encode()
    return text


def _result(conn) -> pq.abc.PGresult:
    # Connection.wait: on KeyboardInterrupt/SystemExit it cancels the query and drains the
    # result, as psycopg's cursor does, instead of leaving the connection ACTIVE.
    return conn.wait(generators.execute(conn.pgconn))[-1]


def first_row(connection, sql: str, params: list) -> tuple | None | object:
    """The first row of ``sql`` (``%s`` placeholders) with ``params`` on Django's PostgreSQL
    ``connection``, None when it returns no row, or :data:`UNSUITABLE` (nothing was sent).

    For fixed SQL: each text is kept (numbered, and prepared on each connection) for the
    process's life (psycopg, which takes any SQL, keeps at most 100)."""
    if connection.vendor != "postgresql" or connection.queries_logged or connection.execute_wrappers:
        return UNSUITABLE
    try:
        values = [_param(value) for value in params]
        text = _text(sql)
    except ValueError:
        return UNSUITABLE
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    conn = connection.connection
    if conn.adapters.get_loader(_TIMESTAMPTZ, pq.Format.TEXT).timezone != connection.timezone:
        return UNSUITABLE  # Django's cursor would load timestamps in another zone than the connection's
    with connection.wrap_database_errors, conn.lock:  # (the lock psycopg's cursor takes)
        pgconn = conn.pgconn
        prepared = getattr(conn, "_capacity_portal_first_row", None)
        if prepared is None:
            prepared = conn._capacity_portal_first_row = _Prepared()
        use_prepared = connection.settings_dict["OPTIONS"].get("prepare_threshold") is not None
        for attempt in (1, 2):
            if not use_prepared:
                pgconn.send_query_params(text, values)
            else:
                name = prepared.names.get(text)
                if name is None:
                    name = prepared.new_name()
                    pgconn.send_prepare(name, text)
                    result = _result(conn)
                    if result.status != pq.ExecStatus.COMMAND_OK:
                        raise errors.error_from_result(result, encoding=conn.info.encoding)
                    prepared.names[text] = name
                pgconn.send_query_prepared(name, values)
            result = _result(conn)
            if result.status == pq.ExecStatus.TUPLES_OK:
                if result.ntuples == 0:
                    return None
                return tuple(None if (value := result.get_value(0, i)) is None
                             else prepared.loader(conn, result.ftype(i)).load(value) for i in range(result.nfields))
            if result.status != pq.ExecStatus.FATAL_ERROR:
                raise errors.ProgrammingError(f"the statement gave no rows ({pq.ExecStatus(result.status).name})")
            error = errors.error_from_result(result, encoding=conn.info.encoding)
            # A prepared statement the server no longer has (DISCARD ALL), or whose result type
            # changed under it (a migration replaced the function): it did not run; prepare again.
            if use_prepared and attempt == 1 and (
                    error.sqlstate == "26000"
                    or (error.sqlstate == "0A000" and error.diag.source_function == "RevalidateCachedQuery")):
                del prepared.names[text]
                if error.sqlstate == "0A000":  # the stale statement still exists: drop it
                    pgconn.send_query(b"DEALLOCATE " + name)
                    _result(conn)
                continue
            raise error
    raise AssertionError("unreachable")
