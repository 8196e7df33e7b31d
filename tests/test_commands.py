from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from products.models import Grant, Refresh
from teams.models import ApiKey
from usage.models import Kind, LedgerEntry

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db


def test_grant_capacity_uses_the_service(world):
    out = io.StringIO()
    call_command("grant_capacity", "acme", "cloud-tokens", "500", "--source", "promotion", "--refresh", "monthly",
                 "--starts", "2026-01-10", "--ends", "2026-07-10", stdout=out)
    grant = Grant.objects.get()
    assert (grant.quantity, grant.source, grant.refresh) == (500, "promotion", Refresh.MONTHLY)
    assert LedgerEntry.objects.filter(grant=grant, kind__in=[Kind.GRANT, Kind.REFRESH]).exists()
    assert "Granted 500 tokens of cloud-tokens to acme" in out.getvalue()


@pytest.mark.parametrize("args", [["nope", "cloud-tokens", "5"], ["acme", "nope", "5"], ["acme", "cloud-tokens", "0"],
                                  ["acme", "cloud-tokens", "5", "--ends", "not-a-date"],
                                  ["acme", "cloud-tokens", "5", "--starts", "2026-02-01", "--ends", "2026-01-01"]])
def test_grant_capacity_rejects_bad_input(world, args):
    with pytest.raises(CommandError):
        call_command("grant_capacity", *args, stdout=io.StringIO())
    assert not Grant.objects.exists()


def test_create_api_key_prints_the_key_alone_on_the_last_line(world):
    out = io.StringIO()
    call_command("create_api_key", "acme", "--name", "render farm", stdout=out)
    raw = out.getvalue().strip().splitlines()[-1]
    key = ApiKey.objects.get()
    assert key.name == "render farm" and key.team.slug == "acme"
    assert raw.startswith(key.prefix) and key.hashed_key == ApiKey.hash(raw) and raw not in key.hashed_key


def test_create_api_key_unknown_team(db):
    with pytest.raises(CommandError):
        call_command("create_api_key", "nope", stdout=io.StringIO())


def test_seed_demo_twice_changes_nothing(db):
    call_command("seed_demo", "--days", "5", stdout=io.StringIO())
    counts = (LedgerEntry.objects.count(), Grant.objects.count())
    call_command("seed_demo", "--days", "5", stdout=io.StringIO())
    assert (LedgerEntry.objects.count(), Grant.objects.count()) == counts
    statuses = {b.status for t in __import__("teams.models", fromlist=["Team"]).Team.objects.all()
                for b in __import__("products.selectors", fromlist=["x"]).team_balances(t)}
    assert statuses >= {"ok"}


@pytest.mark.parametrize(("env", "message"), [
    ({"DJANGO_DEBUG": "0"}, "SECRET_KEY must be set"),
    ({"DJANGO_DEBUG": "maybe"}, "is not a boolean"),
    ({"DATABASE_URL": "mysql://x/y"}, "not supported"),
    ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
    ({"API_RATE_LIMIT_PER_MINUTE": "lots"}, "is not an integer"),
    ({"PORTAL_URL": "portal.example.com"}, "PORTAL_URL"),
    ({"PORTAL_URL": "ftp://portal.example.com"}, "PORTAL_URL"),
    ({"PORTAL_URL": "https://user:secret@portal.example.com"}, "PORTAL_URL"),
    ({"PORTAL_URL": "https://portal.example.com:port"}, "PORTAL_URL"),
    ({"PORTAL_URL": "https://portal.example.com/?x"}, "PORTAL_URL"),
    ({"PORTAL_URL": "http://:8000"}, "PORTAL_URL"),
])
def test_bad_configuration_fails_at_startup_with_one_line(env, message):
    import os

    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "PYTEST_VERSION"}}
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
