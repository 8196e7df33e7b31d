"""docker-compose.yml (Docker does not run here): services, commands and env agree with the code."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def env_example() -> dict[str, str]:
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def test_the_five_services_with_healthchecks():
    assert set(SERVICES) == {"web", "worker", "beat", "postgres", "redis"}
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_app_services_share_one_image_and_one_env_file():
    for name in ("web", "worker", "beat"):
        s = SERVICES[name]
        assert s["build"] == "." and s["env_file"] == ".env", name
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (ROOT / "Dockerfile").exists()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_commands_refer_to_real_modules():
    web = " ".join(command("web"))
    assert "manage.py migrate" in web
    gunicorn = re.search(r"gunicorn (\S+)", web).group(1)
    module, _, attr = gunicorn.partition(":")
    assert module == "capacity_portal.wsgi" and importlib.util.find_spec(module) is not None
    assert command("worker")[:4] == ["celery", "-A", "capacity_portal", "worker"]
    assert command("beat")[:4] == ["celery", "-A", "capacity_portal", "beat"]
    import capacity_portal

    assert capacity_portal.celery_app.main == "capacity_portal"  # what `celery -A capacity_portal` finds


def test_healthchecks_use_real_endpoints():
    from django.urls import resolve

    web_check = " ".join(SERVICES["web"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000(/\S*?)'", web_check).group(1)
    assert resolve(path).url_name == "healthz"
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert SERVICES["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_env_file_matches_the_settings_and_the_services():
    env = env_example()
    settings_source = (ROOT / "capacity_portal" / "settings.py").read_text()
    read_by_settings = set(re.findall(r'env_(?:str|bool|int|list)\(\s*"([A-Z_]+)"', settings_source))
    portal_names = {n for n in env if not n.startswith("POSTGRES_")}
    assert portal_names <= read_by_settings, portal_names - read_by_settings
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS", "DJANGO_DEBUG"} <= portal_names

    db = urlsplit(env["DATABASE_URL"])
    assert (db.hostname, db.username, db.password, db.path.lstrip("/")) == (
        "postgres", env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"


def test_settings_load_from_the_env_file():
    """The production settings accept .env.example as is (no Docker needed to find a typo)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTEST_VERSION", "CAPACITY_PORTAL_TESTING"}}
    env.update(env_example())
    probe = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'capacity_portal.settings'); "
        "django.setup(); from django.conf import settings as s; from capacity_portal.celery import app; "
        "print(s.DEBUG, s.DATABASES['default']['ENGINE'], s.DATABASES['default']['HOST'], "
        "app.conf.broker_url, app.conf.task_always_eager, s.EMAIL_BACKEND.rsplit('.', 2)[1], "
        "s.CACHES['default']['BACKEND'])"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "capacity_portal.postgresql", "postgres", "redis://redis:6379/0",
                                  "False", "console", "capacity_portal.cache.RedisCache"]


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_worker_and_beat_read_the_schedule_and_tasks(service):
    from django.conf import settings

    from capacity_portal.celery import app

    app.loader.import_default_modules()
    assert all(entry["task"] in app.tasks for entry in settings.CELERY_BEAT_SCHEDULE.values())


@pytest.mark.parametrize("module", ["capacity_portal.wsgi", "capacity_portal.asgi"])
def test_entry_point_freezes_what_it_loaded(module):
    """The server's entry point leaves Django and the apps out of the collector's walks (frozen),
    with the collector itself still on for what requests allocate."""
    # (garbage left from the imports was collected before the freeze: none is frozen with them)
    code = (f"import gc, {module}; "
            "print(gc.get_freeze_count(), gc.isenabled(), gc.unfreeze() or gc.collect())")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTEST_VERSION"}}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    frozen, enabled, frozen_garbage = int(out[0]), out[1], int(out[2])
    assert frozen > 50_000 and enabled == "True" and frozen_garbage == 0
