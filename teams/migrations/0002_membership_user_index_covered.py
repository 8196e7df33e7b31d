"""Foreign keys whose own index another index already covers (it leads with the same
column): the one-column index goes, the foreign key stays (see
``capacity_portal.migration_ops``). Fewer indexes to write on every ledger, event and
rollup row."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

from capacity_portal.migration_ops import drop_covered_indexes


class Migration(migrations.Migration):

    dependencies = [
        ('teams', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='membership',
                    name='user',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='memberships', to=settings.AUTH_USER_MODEL),
                ),
            ],
            database_operations=[drop_covered_indexes(
                ("teams", "membership", "user"),
            )],
        ),
    ]
