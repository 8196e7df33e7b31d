"""Migration operations shared by the apps' migrations.

``drop_covered_indexes``: a foreign key's own one-column index, dropped where another
index already leads with that column (the unique ``(team, ...)`` constraints, the
``(team, product, ...)`` indexes). Django's ``AlterField(db_index=False)`` would also
drop and re-add the foreign key, which validates the whole table under a lock that
stops writes (minutes on a large ledger); this drops the index alone.

``index_foreign_keys_where_set``: a mostly-empty foreign key's one-column index replaced
by a partial one of the rows where it is set. A delete's foreign key check (``col = x``)
uses it all the same; the rows without a value write no index entry. On PostgreSQL both
steps run ``CONCURRENTLY`` (writes go on while the index is built), so the migration
holding it must be ``atomic = False``.

``on_postgresql``: raw SQL run only on PostgreSQL (the functions, triggers and tables the
fast paths use; SQLite has none of them and takes the Python paths).
"""

from __future__ import annotations

from django.db import migrations


def on_postgresql(forward_sql: str, reverse_sql: str) -> migrations.RunPython:
    """``RunPython`` executing ``forward_sql`` (reversed: ``reverse_sql``) on PostgreSQL only."""

    def run(sql):
        def operation(apps, schema_editor):
            if schema_editor.connection.vendor == "postgresql":
                schema_editor.execute(sql, params=None)

        return operation

    return migrations.RunPython(run(forward_sql), run(reverse_sql))


def drop_covered_indexes(*fields: tuple[str, str, str]) -> migrations.RunPython:
    """``RunPython`` dropping the one-column index Django made for each ``(app_label, model,
    field)`` (reversed: created again, as Django makes it)."""

    def forwards(apps, schema_editor):
        for app_label, model_name, field_name in fields:
            model = apps.get_model(app_label, model_name)
            column = model._meta.get_field(field_name).column
            # Only the index Django made for the field (a hand-made one on the column stays).
            name = schema_editor._create_index_name(model._meta.db_table, [column], suffix="")
            schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")

    def backwards(apps, schema_editor):
        for app_label, model_name, field_name in fields:
            model = apps.get_model(app_label, model_name)
            field = model._meta.get_field(field_name)
            schema_editor.execute(schema_editor._create_index_sql(model, fields=[field]))

    return migrations.RunPython(forwards, backwards)


def index_foreign_keys_where_set(*fields: tuple[str, str, str, str]) -> migrations.RunPython:
    """``RunPython`` replacing, for each ``(app_label, model, field, index name)``, the
    one-column index Django made for the field by the partial index ``index name`` on the
    same column ``WHERE column IS NOT NULL`` (built before the old one goes, so a foreign
    key check always has one). Reversed: Django's index again, then the partial one goes."""

    def forwards(apps, schema_editor):
        for spec in fields:
            _swap_index(apps, schema_editor, *spec, where_set=True)

    def backwards(apps, schema_editor):
        for spec in fields:
            _swap_index(apps, schema_editor, *spec, where_set=False)

    return migrations.RunPython(forwards, backwards)


def _swap_index(apps, schema_editor, app_label: str, model_name: str, field_name: str, name: str, *,
                where_set: bool) -> None:
    """Build the field's partial index ``name`` (``where_set``) or Django's whole one, then
    drop the other."""
    model = apps.get_model(app_label, model_name)
    column = model._meta.get_field(field_name).column
    table = model._meta.db_table
    django_name = schema_editor._create_index_name(table, [column], suffix="")
    build, drop = (name, django_name) if where_set else (django_name, name)
    q = schema_editor.quote_name
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    where = f" WHERE {q(column)} IS NOT NULL" if where_set else ""
    # A CREATE INDEX CONCURRENTLY that failed (or was cancelled) leaves an invalid index
    # behind, which IF NOT EXISTS would take for a built one: dropped first.
    if _index_valid(schema_editor, build) is False:
        schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {q(build)}")
    schema_editor.execute(f"CREATE INDEX {concurrently}IF NOT EXISTS {q(build)} ON {q(table)} ({q(column)}){where}")
    if concurrently and _index_valid(schema_editor, build) is not True:  # (the old one stays then)
        raise RuntimeError(f"index {build} is not valid after its build; {drop} is kept")
    schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {q(drop)}")


def _index_valid(schema_editor, name: str) -> bool | None:
    """Whether the index ``name`` (found as DROP INDEX finds it: on the search path) is
    valid; None when there is none, or off PostgreSQL (no invalid indexes there)."""
    if schema_editor.connection.vendor != "postgresql":
        return None
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                       [schema_editor.quote_name(name)])
        row = cursor.fetchone()
    return row[0] if row else None
