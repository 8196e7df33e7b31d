"""PostgreSQL itself refuses UPDATE, DELETE and TRUNCATE on ledger rows.

The only way around it is a session that sets ``capacity_portal.ledger_purge = on``
(used to empty the test database between transactional tests); UPDATE is never
allowed.
"""

from django.db import migrations

from capacity_portal.migration_ops import on_postgresql

PG_UP = """
CREATE OR REPLACE FUNCTION usage_ledger_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE')
       AND coalesce(current_setting('capacity_portal.ledger_purge', true), '') = 'on' THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'usage_ledgerentry is append-only: % refused', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER usage_ledger_no_update BEFORE UPDATE OR DELETE ON usage_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION usage_ledger_append_only();
CREATE TRIGGER usage_ledger_no_truncate BEFORE TRUNCATE ON usage_ledgerentry
    FOR EACH STATEMENT EXECUTE FUNCTION usage_ledger_append_only();
"""
PG_DOWN = """
DROP TRIGGER IF EXISTS usage_ledger_no_update ON usage_ledgerentry;
DROP TRIGGER IF EXISTS usage_ledger_no_truncate ON usage_ledgerentry;
DROP FUNCTION IF EXISTS usage_ledger_append_only();
"""


class Migration(migrations.Migration):
    dependencies = [("usage", "0001_initial")]
    operations = [on_postgresql(PG_UP, PG_DOWN)]
