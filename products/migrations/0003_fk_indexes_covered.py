"""Foreign keys whose own index another index already covers (it leads with the same
column): the one-column index goes, the foreign key stays (see
``capacity_portal.migration_ops``). Fewer indexes to write on every ledger, event and
rollup row."""

import django.db.models.deletion
from django.db import migrations, models

from capacity_portal.migration_ops import drop_covered_indexes


class Migration(migrations.Migration):

    dependencies = [
        ('products', '0002_teamproduct_refresh_cache'),
        ('teams', '0002_membership_user_index_covered'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='grant',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='grants', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='lot',
                    name='grant',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='lots', to='products.grant'),
                ),
                migrations.AlterField(
                    model_name='lot',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='teamproduct',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='team_products', to='teams.team'),
                ),
            ],
            database_operations=[drop_covered_indexes(
                ("products", "grant", "team"),
                ("products", "lot", "grant"),
                ("products", "lot", "team"),
                ("products", "teamproduct", "team"),
            )],
        ),
    ]
