"""Migration operations shared by the apps' migrations.

``drop_covered_indexes``: a foreign key's own one-column index, dropped where another
index already leads with that column (the unique ``(team, ...)`` constraints, the
``(team, product, ...)`` indexes). Django's ``AlterField(db_index=False)`` would also
drop and re-add the foreign key, which validates the whole table under a lock that
stops writes (minutes on a large ledger); this drops the index alone.
"""

from __future__ import annotations

from django.db import migrations


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
