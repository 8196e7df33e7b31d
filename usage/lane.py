"""The consume lane: ``POST /api/v1/usage`` consumes answered before Django's request cycle.

A WSGI wrapper around Django's application (``capacity_portal.wsgi``). Measured under
load (``make bench``), Django's request cycle and the django-ninja operation (middleware,
URL resolving, ninja's auth and body parsing, the response pipeline) were about two
thirds of a consume's Python time: the lane answers the API's commonest request without
them, through the same service call.

What it answers: a consume the ninja operation would take as it is (an ``Authorization:
Bearer`` key, a JSON body that ``UsageIn`` validates, kind ``consume``, a time inside
the window, within the key's rate limit) and that the one-round-trip consume
(``usage.services.usage_consume_with_key``) records or replays. Everything else, and
every consume it does not finish (a refusal, an unknown key, a balance with something
due, a database error, a bug here), goes to Django unchanged: the ninja operation stays
the reference and answers exactly as before. Handing over is always safe: either
nothing was written, or the write is found again by its idempotency key and replayed.

What it keeps of Django's request cycle: ``ALLOWED_HOSTS`` (``get_host``), the request
body limit, the SSL redirect (handed over), the request signals (``request_started``,
``request_finished``: the database connection's care among others), and the response
headers the middleware give an API response (SecurityMiddleware, XFrameOptionsMiddleware,
a Content-Length). ``tests/test_consume_lane.py`` holds its answers to Django's, headers
included, and runs the API's tests through it.

The per-key rate limit is counted once, by the consume's own statement (no round trip of
its own; see migrations ``usage.0009`` and ``usage.0010``): a consume whose count was
committed and which the lane then hands over (over the limit, a bad key, a conflict)
carries :data:`RATE_COUNTED` in its environ (not an ``HTTP_`` key, so no request header
can set it) with its count, and the API's auth does not count it again; a statement that
raised (a refusal, a hand-over) rolled its count back, and the API's auth counts the
request.

PostgreSQL only (the one-round-trip consume); elsewhere, and under ASGI, Django serves
every request.
"""

from __future__ import annotations

import io
import json
import logging
from http import HTTPStatus

import pydantic
from django.conf import settings
from django.core import signals
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIRequest
from django.db import DatabaseError
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import get_script_prefix, reverse
from django.utils import timezone

logger = logging.getLogger(__name__)

# environ key: (the SHA-256 of the bearer key, the count) of a request the lane has counted.
RATE_COUNTED = "capacity_portal.rate_counted"
# The middleware whose effect on an API consume the lane reproduces (their response headers,
# below; the SSL redirect and CommonMiddleware's refusals are handed over), or which have
# none on it: static files only, a session and messages never touched, a CSRF-exempt API,
# a lazy user, htmx's request attributes. With any other middleware the lane steps aside.
_ACCOUNTED_MIDDLEWARE = {
    "django.middleware.security.SecurityMiddleware": SecurityMiddleware,
    "django.middleware.clickjacking.XFrameOptionsMiddleware": XFrameOptionsMiddleware,
    "whitenoise.middleware.WhiteNoiseMiddleware": None,
    "django.contrib.sessions.middleware.SessionMiddleware": None,
    "django.middleware.common.CommonMiddleware": None,
    "django.middleware.csrf.CsrfViewMiddleware": None,
    "django.contrib.auth.middleware.AuthenticationMiddleware": None,
    "django.contrib.messages.middleware.MessageMiddleware": None,
    "django_htmx.middleware.HtmxMiddleware": None,
}


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization`` value as django-ninja's ``HttpBearer`` reads it."""
    if not header:
        return None
    parts = header.split(" ")
    if parts[0].lower() != "bearer":
        return None
    return " ".join(parts[1:])


class ConsumeLane:
    """WSGI application: the consume lane in front of ``app`` (Django's)."""

    def __init__(self, app):
        self.app = app
        # The path inside the app (PATH_INFO), without any script prefix reverse() may add.
        self.path = "/" + reverse("api-v1:post_usage")[len(get_script_prefix()):]
        self._headers: dict[bool, list] = {}
        self._steps_aside: bool | None = None
        signals.setting_changed.connect(self._settings_changed)  # (weakly: a lane that goes, goes)

    def _settings_changed(self, **kwargs) -> None:
        """What the lane derived from the settings is derived again (tests override them)."""
        self._headers = {}
        self._steps_aside = None

    def _stepping_aside(self) -> bool:
        """Whether the settings make the lane hand every consume to Django: CommonMiddleware
        may refuse or redirect it, or some middleware is not one the lane accounts for."""
        if self._steps_aside is None:
            self._steps_aside = bool(settings.DISALLOWED_USER_AGENTS or settings.PREPEND_WWW
                                     or self._header_middleware() is None)
        return self._steps_aside

    @staticmethod
    def _header_middleware() -> list | None:
        """The configured middleware classes whose response headers the lane adds, in order;
        None when some middleware is not one the lane accounts for."""
        if any(name not in _ACCOUNTED_MIDDLEWARE for name in settings.MIDDLEWARE):
            return None
        return [_ACCOUNTED_MIDDLEWARE[name] for name in settings.MIDDLEWARE if _ACCOUNTED_MIDDLEWARE[name]]

    def _middleware_headers(self, secure: bool) -> list[tuple[str, str]]:
        """The headers the middleware add to an API response (a secure request's or not), found
        by running them on an empty response; they depend on nothing else but their settings
        (found again when a setting changes)."""
        headers = self._headers.get(secure)
        if headers is None:
            request = WSGIRequest({"REQUEST_METHOD": "POST", "PATH_INFO": self.path, "wsgi.input": io.BytesIO(),
                                   "wsgi.url_scheme": "https" if secure else "http"})
            response = HttpResponse()
            plain = set(response.headers)
            no_response = lambda request: None  # noqa: E731 - only their process_response runs
            for middleware in reversed(self._header_middleware() or []):  # (responses go outwards)
                middleware(no_response).process_response(request, response)
            headers = self._headers[secure] = [(k, v) for k, v in response.items() if k not in plain]
        return headers

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)  # (every other request: nothing more done here)
        from . import fastpath

        if not fastpath.enabled():  # the one-statement consume: PostgreSQL, not switched off
            return self.app(environ, start_response)
        # A request to Django's eyes: its signals (the database connection's care, among others).
        signals.request_started.send(sender=self.__class__, environ=environ)
        try:
            response = self._answer(environ)
        except Exception:  # a bug here must not cost the request: Django answers it (replays if written)
            logger.exception("consume lane: handing the request to Django after an error")
            response = None
        if response is None:
            signals.request_finished.send(sender=self.__class__)  # the lane's request ends; Django's begins
            return self.app(environ, start_response)
        status, headers, body = response
        start_response(status, headers)
        return _Answer(body)

    def _answer(self, environ) -> tuple[str, list, bytes] | None:
        """(status line, headers, body) of a consume the lane takes, or None: Django answers."""
        from . import api, fastpath
        from .errors import InvalidRequest, UsageError

        token = bearer_token(environ.get("HTTP_AUTHORIZATION", ""))
        if not token or len(token) > api.MAX_TOKEN_LENGTH:
            return None
        if self._stepping_aside():
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if length <= 0 or (limit is not None and length > limit):
            return None
        try:
            body = environ["wsgi.input"].read(length)
        except OSError:  # the client went away: Django reads what is left
            return None
        environ["wsgi.input"] = io.BytesIO(body)  # Django reads it again if the lane hands over
        request = WSGIRequest(environ)
        try:
            request.get_host()
        except DisallowedHost:
            return None
        secure = request.is_secure()
        if settings.SECURE_SSL_REDIRECT and not secure:
            return None
        try:
            data = api.UsageIn.model_validate(json.loads(body))
        except (ValueError, RecursionError, pydantic.ValidationError):
            return None
        if data.kind != "consume":
            return None
        try:
            api.check_event(data, timezone.now())
        except InvalidRequest:
            return None
        hashed = api.ApiKey.hash(token)
        rate = api.statement_rate()  # the consume's statement counts the request against the key's limit
        try:
            outcome = api.consume_with_key(hashed, data, rate=rate)
        except (fastpath.OverLimit, fastpath.KeyRejected, UsageError, DatabaseError):
            # Django answers: 429 or 401 (over the limit), 401 (a bad key), the refusal. A count
            # the statement committed goes with the request; a rolled-back one is made again there.
            return None
        finally:
            if rate is not None and rate.count is not None:
                environ[RATE_COUNTED] = (hashed, rate.count)
        if outcome is None:  # something is due on the balance: the Python path
            return None
        content = api.render(outcome.body)
        headers = [("Content-Type", api.CONTENT_TYPE), ("Content-Length", str(len(content))),
                   *self._middleware_headers(secure)]
        if outcome.replayed:
            headers.append(("Idempotent-Replayed", "true"))
        status = HTTPStatus(outcome.status_code)
        return f"{status.value} {status.phrase}", headers, content


class _Answer(list):
    """The body of an answer: closed by the server after sending it, which ends the request
    (``request_finished``) as Django's response does."""

    def __init__(self, body: bytes):
        super().__init__([body])

    def close(self) -> None:
        signals.request_finished.send(sender=ConsumeLane)
