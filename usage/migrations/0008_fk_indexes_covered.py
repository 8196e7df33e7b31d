"""Foreign keys whose own index another index already covers (it leads with the same
column): the one-column index goes, the foreign key stays (see
``capacity_portal.migration_ops``). Fewer indexes to write on every ledger, event and
rollup row."""

import django.db.models.deletion
from django.db import migrations, models

from capacity_portal.migration_ops import drop_covered_indexes


class Migration(migrations.Migration):

    dependencies = [
        ('teams', '0002_membership_user_index_covered'),
        ('usage', '0007_consume_api_function'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='alertstate',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='checkout',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='dailybreakdown',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='dailyrollup',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='event',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='events', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='ledgerentry',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='teams.team'),
                ),
                migrations.AlterField(
                    model_name='reconciliationcheck',
                    name='run',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='checks', to='usage.reconciliationrun'),
                ),
            ],
            database_operations=[drop_covered_indexes(
                ("usage", "alertstate", "team"),
                ("usage", "checkout", "team"),
                ("usage", "dailybreakdown", "team"),
                ("usage", "dailyrollup", "team"),
                ("usage", "event", "team"),
                ("usage", "ledgerentry", "team"),
                ("usage", "reconciliationcheck", "run"),
            )],
        ),
    ]
