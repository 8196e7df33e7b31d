"""The consume lane (usage.lane): what it answers itself, that its answers are Django's, and
that it hands everything else to Django. (tests/test_api.py runs the whole API suite through
it as well.)"""

from __future__ import annotations

import json
import re

import pytest
from django.core import signals
from django.test import Client, RequestFactory
from django.urls import set_script_prefix
from ninja.security import HttpBearer

from capacity_portal.wsgi import application
from teams.services import api_key_create
from usage import api as usage_api
from usage.lane import ConsumeLane, bearer_token
from usage.models import Event, Kind, LedgerEntry

from .conftest import key
from .factories import make_grant
from .lane import connection_kept, through_lane

pytestmark = pytest.mark.django_db

URL = "/api/v1/usage"


@pytest.fixture
def acme(world):
    team = world["team"]
    make_grant(team, world["tokens"], 100)
    make_grant(team, world["pool"], 10)
    world["raw"] = api_key_create(team=team, name="lane")[1]
    return world


def consume(raw: str, *, quantity: int = 1, k: str | None = None, **extra) -> dict:
    return {"product": "cloud-tokens", "kind": "consume", "quantity": quantity, "idempotency_key": k or key(),
            **extra}


def post(raw: str | None, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Authorization": f"Bearer {raw}"} if raw else {}
    headers.update(kwargs.pop("headers", {}))
    return through_lane("POST", URL, data, headers=headers, **kwargs)


def django_post(raw: str, body, **kwargs):
    return Client().post(URL, json.dumps(body), content_type="application/json",
                         headers={"Authorization": f"Bearer {raw}"}, **kwargs)


def consumed() -> int:
    return -sum(LedgerEntry.objects.filter(kind=Kind.CONSUME).values_list("delta", flat=True))


def test_the_wsgi_application_is_the_lane_in_front_of_django():
    assert isinstance(application, ConsumeLane)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("Bearer a b", "a b"), ("Bearer", ""), ("", None),
    ("Basic abc", None), ("Bearerabc", None),
])
def test_bearer_token_reads_the_header_as_ninja_does(header, token):
    assert bearer_token(header) == token


# -- what the lane answers (PostgreSQL: the one-round-trip consume) --------------------------------


def test_a_plain_consume_is_answered_by_the_lane_as_django_answers_it(acme, require_postgres):
    lane = post(acme["raw"], consume(acme["raw"], quantity=3, user="a@acme.example", service="render"))
    assert lane.lane, "the lane handed a plain consume to Django"
    assert lane.wsgi_status == "201 Created"
    ours = django_post(acme["raw"], consume(acme["raw"], quantity=3, user="a@acme.example", service="render"))
    assert ours.status_code == 201
    body, reference = lane.json(), ours.json()
    assert set(body) == set(reference)
    assert body["available"] == 97 and reference["available"] == 94 and body["total"] == 100
    assert {k: body[k] for k in ("product", "kind", "quantity", "charged")} == \
        {"product": "cloud-tokens", "kind": "consume", "quantity": 3, "charged": 3}
    # Same headers as Django's response (Content-Length: its own body's).
    assert dict(lane.items()).keys() == dict(ours.items()).keys() | {"Content-Length"}
    for name, value in ours.items():
        assert lane[name] == value, name
    assert int(lane["Content-Length"]) == len(lane.content)
    assert consumed() == 6
    entry = LedgerEntry.objects.get(event_id=body["id"])
    assert (entry.user, entry.service, entry.actor_api_key.team_id) == ("a@acme.example", "render", acme["team"].pk)


def test_a_retry_is_replayed_by_the_lane_and_a_changed_body_goes_to_django(acme, require_postgres):
    body = consume(acme["raw"], quantity=2, k="job-1")
    first = post(acme["raw"], body)
    again = post(acme["raw"], body)
    assert first.lane and again.lane
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert consumed() == 2 and Event.objects.count() == 1
    conflict = post(acme["raw"], {**body, "quantity": 3})
    assert not conflict.lane
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    assert consumed() == 2


def test_the_lane_gives_a_secure_request_the_headers_django_gives_it(acme, settings, require_postgres):
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    lane = post(acme["raw"], consume(acme["raw"]), secure=True)
    ours = Client().post(URL, json.dumps(consume(acme["raw"])), content_type="application/json", secure=True,
                         headers={"Authorization": f"Bearer {acme['raw']}"})
    assert lane.lane and ours.status_code == 201
    assert lane["Strict-Transport-Security"] == ours["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"
    assert "Strict-Transport-Security" not in post(acme["raw"], consume(acme["raw"]))


def test_a_consume_the_lane_counted_and_handed_over_counts_once(acme, settings, own_cache,
                                                                  require_postgres):
    settings.API_RATE_LIMIT_PER_MINUTE = 3
    for _ in range(2):  # refused by the one-round-trip consume, then answered by Django
        refused = post(acme["raw"], consume(acme["raw"], quantity=10**6))
        assert not refused.lane and refused.status_code == 409
    assert post(acme["raw"], consume(acme["raw"])).lane
    limited = post(acme["raw"], consume(acme["raw"]))
    assert not limited.lane
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert consumed() == 1


def test_an_error_in_the_lane_hands_the_request_to_django(acme, monkeypatch, caplog, require_postgres):
    """Even after the write: Django finds it by its key and replays it."""
    def broken(data):
        raise RuntimeError("bug")

    monkeypatch.setattr(usage_api, "render", broken)  # (only the lane renders this way)
    response = post(acme["raw"], consume(acme["raw"], quantity=4))
    assert not response.lane
    assert response.status_code == 201 and response.json()["available"] == 96
    assert response["Idempotent-Replayed"] == "true"
    assert consumed() == 4
    assert "handing the request to Django" in caplog.text


def test_something_due_on_the_balance_goes_to_the_python_path(acme, monkeypatch, require_postgres, caplog):
    monkeypatch.setattr(usage_api, "consume_with_key", lambda key_hash, data, rate=None: None)  # as when a lot is due
    response = post(acme["raw"], consume(acme["raw"]))
    assert not response.lane and response.status_code == 201
    assert consumed() == 1
    assert "handing the request to Django after an error" not in caplog.text  # (a plain hand-over, no bug)


# -- what it hands to Django -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bad key", "no key", "invalid body", "not json", "checkout", "not held",
                                  "overdraft", "too far back", "unknown field"])
def test_everything_but_a_plain_consume_is_answered_by_django(acme, case):
    raw = acme["raw"]
    body, expected = {
        "bad key": (consume(raw), (401, "unauthorized")),
        "no key": (consume(raw), (401, "unauthorized")),
        "invalid body": ({"kind": "consume"}, (422, "invalid_request")),
        "not json": ("{nope", (422, "invalid_request")),
        "checkout": ({**consume(raw), "product": "asset-pool", "kind": "checkout", "checkout_id": "c1"}, (201, None)),
        "not held": ({**consume(raw), "product": "nope"}, (404, "not_found")),
        "overdraft": (consume(raw, quantity=101), (409, "insufficient_balance")),
        "too far back": ({**consume(raw), "occurred_at": "2001-01-01T00:00:00Z"}, (422, "invalid_request")),
        "unknown field": ({**consume(raw), "colour": "red"}, (422, "invalid_request")),
    }[case]
    token = {"bad key": "cp_nope", "no key": None}.get(case, raw)
    response = post(token, body)
    assert not response.lane
    status, code = expected
    assert response.status_code == status, response.content
    if code:
        assert response.json()["error"]["code"] == code


def test_a_host_not_allowed_is_djangos_400(acme, settings, require_postgres):
    settings.ALLOWED_HOSTS = ["portal.example"]
    response = post(acme["raw"], consume(acme["raw"]), headers={"Host": "evil.example"})
    assert not response.lane and response.status_code == 400
    assert consumed() == 0


def test_a_body_over_the_limit_is_djangos_413(acme, settings, require_postgres):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    response = post(acme["raw"], consume(acme["raw"], service="x" * 100))
    assert not response.lane and response.status_code == 413
    assert consumed() == 0


def test_the_ssl_redirect_is_djangos(acme, settings, require_postgres):
    settings.SECURE_SSL_REDIRECT = True
    response = post(acme["raw"], consume(acme["raw"]))
    assert not response.lane and response.status_code == 301
    assert consumed() == 0


def test_other_paths_and_methods_pass_through(acme):
    assert not through_lane("GET", URL, headers={"Authorization": f"Bearer {acme['raw']}"}).lane
    batch = through_lane("POST", URL + "/batch", json.dumps({"events": [consume(acme["raw"])]}),
                         headers={"Authorization": f"Bearer {acme['raw']}"})
    assert not batch.lane and batch.status_code == 200


def test_without_the_sql_fast_path_django_answers(acme, settings):
    settings.USAGE_SQL_FAST_PATH = False
    response = post(acme["raw"], consume(acme["raw"]))
    assert not response.lane and response.status_code == 201
    assert consumed() == 1


def test_the_lane_sends_the_request_signals(acme, require_postgres):
    """Django's request_started and request_finished (closing stale or broken connections
    among others) come with every request the lane answers."""
    seen = []

    def started(sender, **kwargs):
        seen.append("started")

    def finished(sender, **kwargs):
        seen.append("finished")

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        response = post(acme["raw"], consume(acme["raw"]))
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert response.lane and seen == ["started", "finished"]


def test_the_lane_headers_follow_the_settings(settings):
    lane = ConsumeLane(lambda environ, start_response: [])
    settings.X_FRAME_OPTIONS = "DENY"
    assert ("X-Frame-Options", "DENY") in lane._middleware_headers(False)
    settings.X_FRAME_OPTIONS = "SAMEORIGIN"
    settings.SECURE_HSTS_SECONDS = 60
    assert ("X-Frame-Options", "SAMEORIGIN") in lane._middleware_headers(False)
    assert ("Strict-Transport-Security", "max-age=60") in lane._middleware_headers(True)
    assert not any(name == "Strict-Transport-Security" for name, _ in lane._middleware_headers(False))


@pytest.mark.parametrize("setting, value, status", [
    ("DISALLOWED_USER_AGENTS", [re.compile("badbot")], 403),
    ("PREPEND_WWW", True, 301),
])
def test_what_common_middleware_refuses_or_redirects_is_djangos(acme, settings, require_postgres, setting, value,
                                                                status):
    setattr(settings, setting, value)
    response = post(acme["raw"], consume(acme["raw"]), headers={"User-Agent": "badbot/1.0"})
    assert not response.lane and response.status_code == status
    assert consumed() == 0


def test_the_lane_steps_aside_for_middleware_it_does_not_know(acme, settings, require_postgres):
    assert ConsumeLane._header_middleware() is not None  # the project's own list: the lane takes consumes
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.middleware.gzip.GZipMiddleware"]
    assert ConsumeLane._header_middleware() is None
    response = post(acme["raw"], consume(acme["raw"]))
    assert not response.lane and response.status_code == 201
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "clickjacking" not in m and "gzip" not in m]
    response = post(acme["raw"], consume(acme["raw"]))
    assert response.lane and "X-Frame-Options" not in response  # only the headers of the middleware there are


def test_a_body_the_client_never_finished_is_djangos(acme, require_postgres):
    class Broken:
        def read(self, *args):
            raise OSError("client went away")

    environ = RequestFactory().generic("POST", URL, json.dumps(consume(acme["raw"])), content_type="application/json",
                                       headers={"Authorization": f"Bearer {acme['raw']}"}).environ
    environ["wsgi.input"] = Broken()
    handed = []
    lane = ConsumeLane(lambda environ, start_response: handed.append(environ) or [])
    with connection_kept():
        assert lane(environ, lambda status, headers: None) == []
    assert handed and consumed() == 0


def test_the_lane_path_has_no_script_prefix():
    set_script_prefix("/portal/")
    try:
        assert ConsumeLane(lambda environ, start_response: []).path == "/api/v1/usage"
    finally:
        set_script_prefix("/")


@pytest.mark.parametrize("header", ["Bearer abc", "bearer abc", "BEARER abc", "Bearer  abc", "Bearer abc ", "Bearer",
                                    "Bearer ", " Bearer abc", "Basic abc", "Bearerabc", "Token abc", "Bearer a\tb"])
def test_bearer_token_is_ninjas_reading(rf, header):
    class Echo(HttpBearer):
        def authenticate(self, request, token):
            return ("token", token)

    ninja = Echo()(rf.post(URL, headers={"Authorization": header}))
    assert bearer_token(header) == (ninja[1] if ninja else None)
