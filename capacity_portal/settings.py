"""Settings for the capacity portal: one module, configured from the environment.

The embedded default (no variables set) is SQLite in the project folder with
Celery running tasks eagerly, so ``make run`` needs no server installed.
Bad configuration stops the process at start-up with a one-line message.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent


def _fail(message: str) -> None:
    # SystemExit with a string prints one line to stderr, no traceback.
    sys.exit(f"capacity_portal: configuration error: {message}")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    _fail(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")
    return default


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        _fail(f"{name}={raw!r} is not an integer")
        raise
    if value < minimum:
        _fail(f"{name}={value} must be >= {minimum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def _prepared_statement_options() -> dict:
    """Server-side parameters, and statements prepared after 5 runs on a connection:
    PostgreSQL then skips parsing and planning the queries every page repeats. Off
    (DB_PREPARED_STATEMENTS=0) behind a transaction-mode pooler such as PgBouncer < 1.21."""
    if not env_bool("DB_PREPARED_STATEMENTS", default=True):
        return {}
    return {"server_side_binding": True, "prepare_threshold": 5}


def database_from_url(url: str) -> dict:
    """Parse ``postgres://user:pass@host:port/name`` or ``sqlite:///path``.

    The host may be a Unix socket's directory, percent-encoded
    (``postgres://user@%2Frun%2Fpostgresql/name``) or given as ``?host=/run/postgresql``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in {"postgres", "postgresql", "pgsql"}:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            _fail(f"DATABASE_URL {url!r} names no database")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            port = parts.port
        except ValueError:
            _fail(f"DATABASE_URL {url!r} has an invalid port")
            raise
        return {
            "ENGINE": "capacity_portal.postgresql",  # Django's, with a cheaper health check
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": _url_host(parts),
            "PORT": str(port or ""),
            "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 60),
            "CONN_HEALTH_CHECKS": env_bool("DB_CONN_HEALTH_CHECKS", default=True),
            "OPTIONS": {**_prepared_statement_options(), **options},
            "TEST": {"NAME": f"test_{name}"},
        }
    if scheme == "sqlite":
        path = unquote(parts.path)
        if path.startswith("//"):
            path = path[1:]
        elif path.startswith("/"):
            path = path[1:] if not parts.netloc else path
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": path or str(BASE_DIR / "db.sqlite3"),
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
        }
    _fail(f"DATABASE_URL scheme {scheme!r} is not supported (use postgres:// or sqlite:///)")
    return {}


def _url_host(parts) -> str:
    """The URL's host as written, percent-decoded: a socket directory (``urlsplit``'s
    ``hostname`` lower-cases it and leaves it encoded), an IPv6 literal without its brackets."""
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        return unquote(host[1:].partition("]")[0])  # (a zone id's % is written %25)
    return unquote(host.partition(":")[0])


DEBUG = env_bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        _fail("SECRET_KEY must be set when DJANGO_DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    _fail("ALLOWED_HOSTS must be set when DJANGO_DEBUG is off")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "ninja",  # the API docs page uses ninja's bundled Swagger UI (static files, no CDN)
    "teams",
    "products",
    "usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (CSS, htmx, plotly.js) from the app itself, also with DEBUG off:
    # no CDN and no separate file server needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "capacity_portal.urls"
WSGI_APPLICATION = "capacity_portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
DATABASES = {
    "default": database_from_url(DATABASE_URL)
    if DATABASE_URL
    else {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(BASE_DIR / "db.sqlite3"),
        # IMMEDIATE makes every write transaction take SQLite's write lock up front,
        # so concurrent writers queue instead of failing with "database is locked".
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
USE_THOUSAND_SEPARATOR = False

STATIC_URL = "static/"


def _plotly_package_data() -> Path:
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data"


STATICFILES_DIRS = [
    BASE_DIR / "static",
    # plotly.js as shipped in the Python package: charts work offline, no CDN.
    ("vendor/plotly", _plotly_package_data()),
]
STATIC_ROOT = BASE_DIR / "staticfiles"
# Serve straight from the app and package folders, so nothing breaks before (or without)
# collectstatic; docker compose still collects them into the static volume.
WHITENOISE_USE_FINDERS = True
# STATIC_ROOT exists only after collectstatic; until then the finders serve everything.
warnings.filterwarnings("ignore", message=r"No directory at: .*staticfiles", category=UserWarning)
WHITENOISE_MAX_AGE = 3600

# Email: console in the embedded default, SMTP when EMAIL_HOST is set.
EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=True)
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "capacity-portal@localhost")
# The portal's address as its users reach it (scheme, host, optional port and path prefix),
# for the links in emails. Empty: emails carry no link.
PORTAL_URL = env_str("PORTAL_URL", "http://127.0.0.1:8000" if DEBUG else "").rstrip("/")


def _check_portal_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme.lower() not in {"http", "https"} or not parts.hostname
            or "@" in parts.netloc or any(c in url for c in "?# ")):
        _fail(f"PORTAL_URL {url!r} must be an http:// or https:// address such as https://portal.example.com"
              " (a host, optionally a port and a path; no query, fragment or credentials)")


if PORTAL_URL:
    _check_portal_url(PORTAL_URL)

# Redis / Celery. Without REDIS_URL tasks run eagerly in-process (embedded default).
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    _fail(f"REDIS_URL {REDIS_URL!r} must start with redis://, rediss:// or unix://")
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 30 * 60
CELERY_TASK_SOFT_TIME_LIMIT = 25 * 60
# Visibility timeout must exceed the longest task (hard limit 30 min), else Redis
# redelivers a task that is still running.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2 * 60 * 60}
# Fail fast when Redis is unreachable (a dropped, not refused, connection would otherwise
# wait for the OS TCP timeout): enqueueing logs the failure and the request goes on.
CELERY_BROKER_TRANSPORT_OPTIONS["socket_connect_timeout"] = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
# Periodic work (usage/tasks.py). Each beat task fans out one idempotent task per
# balance; `make run` runs this same schedule in-process (usage run_periodic).
CELERY_BEAT_SCHEDULE: dict = {
    "balances-refresh-due": {"task": "usage.balances_refresh_due", "schedule": 60 * 60},
    "alerts-check-due": {"task": "usage.alerts_check_due", "schedule": 5 * 60},
    "alerts-check-all": {"task": "usage.alerts_check_all", "schedule": 24 * 60 * 60},
    "rollups-verify-recent": {"task": "usage.rollups_verify_recent", "schedule": 60 * 60},
    "rollups-verify-day": {"task": "usage.rollups_verify_recent", "schedule": 24 * 60 * 60, "args": (26,)},
    "ledger-reconcile": {"task": "usage.ledger_reconcile", "schedule": 24 * 60 * 60},
    "events-prune": {"task": "usage.events_prune", "schedule": 24 * 60 * 60},
    "api-rates-prune": {"task": "usage.api_rates_prune", "schedule": 60 * 60},
}

CACHES = {
    "default": (
        {"BACKEND": "capacity_portal.cache.RedisCache", "LOCATION": REDIS_URL}
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# API
API_RATE_LIMIT_PER_MINUTE = env_int("API_RATE_LIMIT_PER_MINUTE", 6000, minimum=0)
API_BATCH_MAX_EVENTS = 1000
IDEMPOTENCY_RETENTION_DAYS = env_int("IDEMPOTENCY_RETENTION_DAYS", 30, minimum=30)
# PostgreSQL: the common consume runs as one SQL function call (usage/fastpath.py).
# Off: every consume takes the Python path (the same results, about 13 round trips).
USAGE_SQL_FAST_PATH = env_bool("USAGE_SQL_FAST_PATH", default=True)

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

# Fast settings for the test run (pytest sets PYTEST_VERSION in the environment).
TESTING = bool(os.environ.get("PYTEST_VERSION")) or env_bool("CAPACITY_PORTAL_TESTING")
if TESTING:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    # Tests run tasks eagerly; the worker integration test starts a real worker itself.
    CELERY_TASK_ALWAYS_EAGER = True
    if DATABASES["default"]["ENGINE"].endswith("postgresql"):
        # Lets the test runner empty the append-only ledger between transactional
        # tests (the trigger still refuses every UPDATE, and DELETE elsewhere).
        DATABASES["default"]["OPTIONS"]["options"] = "-c capacity_portal.ledger_purge=on"
