"""Model instances from the rows of fixed SQL (PostgreSQL), as the ORM would build them."""

from __future__ import annotations

from django.db import connection


def columns(fields, table_alias: str, prefix: str = "") -> str:
    """The select list of ``fields`` (concrete fields) from ``table_alias``, in order."""
    return ", ".join(f'{table_alias}."{f.column}"' + (f' AS "{prefix}{f.column}"' if prefix else "") for f in fields)


def from_row(model, fields, values):
    """An instance of ``model`` from raw column values, through each field's from_db_value (JSON)."""
    values = [f.from_db_value(v, None, connection) if hasattr(f, "from_db_value") else v
              for f, v in zip(fields, values, strict=True)]
    return model.from_db(connection.alias, [f.attname for f in fields], values)
