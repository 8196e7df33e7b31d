"""The usage API (/api/v1/): auth, every error code, tenancy, replays, metered units, history."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from products.selectors import team_balances
from teams.models import ApiKey
from teams.services import api_key_create
from usage import api as usage_api
from usage.models import Event, Kind, LedgerEntry

from .conftest import key
from .factories import ProductFactory, make_grant
from .lane import through_lane

pytestmark = pytest.mark.django_db

BASE = "/api/v1"


@pytest.fixture(autouse=True, params=["django", "lane"])
def transport(request, monkeypatch):
    """Every test twice: through Django's handler, and through the consume lane in front of
    it (which answers plain consumes on PostgreSQL and hands Django everything else)."""
    monkeypatch.setattr(ApiClient, "lane", request.param == "lane")
    return request.param


class ApiClient:
    """django.test.Client speaking JSON with a Bearer key. POSTs go through the consume lane
    when ``lane`` is on (see the ``transport`` fixture)."""

    lane = False

    def __init__(self, raw_key: str | None):
        self.client = Client()
        self.key_hash = ApiKey.hash(raw_key) if raw_key else None
        self.headers = {"Authorization": f"Bearer {raw_key}"} if raw_key else {}

    def post(self, path: str, body, headers: dict | None = None):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if ApiClient.lane:
            return through_lane("POST", BASE + path, data, headers={**self.headers, **(headers or {})})
        return self.client.post(BASE + path, data=data, content_type="application/json",
                                headers={**self.headers, **(headers or {})})

    def get(self, path: str, params: dict | None = None, headers: dict | None = None):
        return self.client.get(BASE + path, params or {}, headers={**self.headers, **(headers or {})})

    def usage(self, product="cloud-tokens", quantity=1, kind="consume", **extra):
        body = {"product": product, "kind": kind, "quantity": quantity, "idempotency_key": extra.pop("k", key()),
                **extra}
        return self.post("/usage", body)


def new_key(team) -> str:
    return api_key_create(team=team, name="test")[1]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def setup_acme(world) -> dict:
    """Team acme: 150 cloud tokens, 10 pooled assets, a key; team globex: its own key."""
    team = world["team"]
    make_grant(team, world["tokens"], 150)
    make_grant(team, world["pool"], 10)
    world["api"] = ApiClient(new_key(team))
    world["globex_api"] = ApiClient(new_key(world["other"]))
    return world


@pytest.fixture
def acme(world):
    return setup_acme(world)


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer nope", "Bearer " + "x" * 500,
                                    "Bearer cp_\x00"])
def test_missing_or_invalid_key_is_401(acme, header):
    headers = {"Authorization": header} if header is not None else {}
    response = Client().get(BASE + "/balances", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response["WWW-Authenticate"] == "Bearer"


def test_revoked_key_is_401(acme):
    raw = new_key(acme["team"])
    api = ApiClient(raw)
    assert api.get("/balances").status_code == 200
    ApiKey.objects.filter(hashed_key=ApiKey.hash(raw)).update(revoked_at=timezone.now())
    assert_error(api.get("/balances"), 401, "unauthorized")
    assert_error(api.usage(), 401, "unauthorized")


def test_last_used_at_written_at_most_once_a_minute(acme):
    raw = new_key(acme["team"])
    api_key = ApiKey.objects.get(hashed_key=ApiKey.hash(raw))
    assert api_key.last_used_at is None
    api = ApiClient(raw)
    api.get("/balances")
    first = ApiKey.objects.get(pk=api_key.pk).last_used_at
    assert first is not None
    api.get("/balances")
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == first  # within the minute: no write
    stale = timezone.now() - timedelta(seconds=61)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=stale)
    api.get("/balances")
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at > stale


def test_last_used_at_touches_only_the_key_used(acme):
    """The key lookup and its last_used_at write are one statement on PostgreSQL: the
    write must hit the authenticating key only (not every stale key)."""
    used, idle, other_team = new_key(acme["team"]), new_key(acme["team"]), new_key(acme["other"])
    stale = timezone.now() - timedelta(minutes=5)
    ApiKey.objects.update(last_used_at=stale)
    assert ApiClient(used).usage().status_code == 201
    assert ApiKey.objects.get(hashed_key=ApiKey.hash(used)).last_used_at > stale
    for raw in (idle, other_team):
        assert ApiKey.objects.get(hashed_key=ApiKey.hash(raw)).last_used_at == stale
    assert ApiKey.objects.filter(last_used_at__gt=stale).count() == 1


@pytest.mark.parametrize("body", [
    b"{not json", {"product": "cloud-tokens", "kind": "consume", "quantity": -1, "idempotency_key": "a"},
    {"product": "cloud-tokens", "kind": "consume", "quantity": 1, "idempotency_key": "a",
     "occurred_at": "2001-01-01T00:00:00Z"},
    {"product": "no-such-product", "kind": "consume", "quantity": 1, "idempotency_key": "a"},
    {"product": "cloud-tokens", "kind": "consume", "quantity": 10**9, "idempotency_key": "a"},
    {"product": "asset-pool", "kind": "checkout", "quantity": 1, "idempotency_key": "a", "checkout_id": "c"},
])
def test_usage_with_a_bad_key_is_401_whatever_the_body(acme, body):
    """POST /usage looks its key up late (in the consume's own statement); a bad key is
    still 401 before any other answer, and nothing is written."""
    ledger = LedgerEntry.objects.count()
    for raw in ("nope", new_key(acme["other"]) + "x"):
        response = ApiClient(raw).post("/usage", body)
        assert_error(response, 401, "unauthorized")
        assert response["WWW-Authenticate"] == "Bearer"
    assert LedgerEntry.objects.count() == ledger


def test_usage_refusals_still_mark_the_key_used(acme):
    """An overdraft rolls the consume's statement back, key bookkeeping included; the
    refusal still counts as a use of the key."""
    raw = new_key(acme["team"])
    assert_error(ApiClient(raw).usage(quantity=10**9), 409, "insufficient_balance")
    assert ApiKey.objects.get(hashed_key=ApiKey.hash(raw)).last_used_at is not None
    other = new_key(acme["team"])
    assert_error(ApiClient(other).usage(product="no-such-product"), 404, "not_found")
    assert ApiKey.objects.get(hashed_key=ApiKey.hash(other)).last_used_at is not None


def test_authenticated_key_carries_its_team(acme):
    """The raw-SQL key lookup builds the key and its team (JSON field included)."""
    from usage.api import _active_key

    acme["team"].alert_thresholds = [10, 25]
    acme["team"].save()
    raw = new_key(acme["team"])
    api_key = _active_key(raw, timezone.now())
    assert api_key.pk == ApiKey.objects.get(hashed_key=ApiKey.hash(raw)).pk
    assert api_key.team.pk == acme["team"].pk and api_key.team.slug == "acme"
    assert api_key.team.alert_thresholds == [10, 25]
    assert api_key.team.tzinfo == acme["team"].tzinfo
    assert _active_key(raw + "x", timezone.now()) is None


def test_openapi_and_docs_need_no_key_and_no_cdn(acme):
    schema = Client().get(BASE + "/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/v1/usage", "/api/v1/usage/batch", "/api/v1/jobs/{job_id}/refund", "/api/v1/balances"} <= set(paths)
    docs = Client().get(BASE + "/docs")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower() and "https://" not in html
    assert '"validatorUrl": null' in html
    from django.contrib.staticfiles import finders

    for asset in ("ninja/swagger-ui-bundle.js", "ninja/swagger-ui.css", "ninja/swagger-ui-init.js"):
        assert finders.find(asset), asset  # shipped in the package, served by our static files


def test_csrf_is_not_required(acme):
    client = Client(enforce_csrf_checks=True)
    body = {"product": "cloud-tokens", "kind": "consume", "quantity": 1, "idempotency_key": key()}
    response = client.post(BASE + "/usage", json.dumps(body), content_type="application/json",
                           headers=acme["api"].headers)
    assert response.status_code == 201


# -- consume, replays, conflicts -----------------------------------------------------------------


def test_consume_returns_201_with_balance(acme):
    response = acme["api"].usage(quantity=10, user="user@example.com", service="rendering", job_id="job-1")
    assert response.status_code == 201
    body = response.json()
    assert body["product"] == "cloud-tokens"
    assert (body["available"], body["total"], body["quantity"], body["charged"]) == (140, 150, 10, 10)
    assert isinstance(body["id"], int)
    assert "Idempotent-Replayed" not in response
    entry = LedgerEntry.objects.get(kind=Kind.CONSUME)
    assert (entry.delta, entry.service, entry.job_id, entry.actor_api_key.team) == (-10, "rendering", "job-1",
                                                                                   acme["team"])


def test_replay_returns_original_status_and_body_and_writes_nothing(acme):
    k = key()
    first = acme["api"].usage(quantity=5, k=k)
    acme["api"].usage(quantity=7)  # the balance moves on meanwhile
    again = acme["api"].usage(quantity=5, k=k)
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 2
    assert Event.objects.filter(key=k).count() == 1


def test_same_key_different_body_is_idempotency_conflict(acme):
    k = key()
    assert acme["api"].usage(quantity=5, k=k).status_code == 201
    assert_error(acme["api"].usage(quantity=6, k=k), 409, "idempotency_conflict")
    assert_error(acme["api"].usage(quantity=5, k=k, service="other"), 409, "idempotency_conflict")
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1


def test_insufficient_balance_writes_nothing_and_key_can_be_retried(acme):
    k = key()
    assert_error(acme["api"].usage(quantity=151, k=k), 409, "insufficient_balance")
    assert not Event.objects.exists()
    assert not LedgerEntry.objects.filter(kind=Kind.CONSUME).exists()
    make_grant(acme["team"], acme["tokens"], 10)
    assert acme["api"].usage(quantity=151, k=k).status_code == 201


def test_unknown_product_is_404(acme):
    assert_error(acme["api"].usage(product="no-such-thing"), 404, "not_found")


def test_product_never_granted_to_the_team_is_404_like_an_unknown_one(acme):
    ProductFactory(code="globex-only")
    make_grant(acme["other"], ProductFactory(code="globex-only"), 100)
    unknown = acme["api"].usage(product="nope-nope").json()["error"]["message"]
    never = assert_error(acme["api"].usage(product="globex-only"), 404, "not_found")["error"]["message"]
    assert never.replace("globex-only", "nope-nope") == unknown  # nothing tells them apart


# -- validation ---------------------------------------------------------------------------------


GOOD = {"product": "cloud-tokens", "kind": "consume", "quantity": 1}


@pytest.mark.parametrize("change", [
    {"quantity": 1.5}, {"quantity": 1.0}, {"quantity": True}, {"quantity": "3"}, {"quantity": 0},
    {"quantity": -1}, {"quantity": 10**15 + 1}, {"quantity": 10**30}, {"quantity": None},
    {"kind": "steal"}, {"kind": None}, {"product": ""}, {"product": 5}, {"product": "x" * 65},
    {"idempotency_key": ""}, {"idempotency_key": "k" * 256}, {"idempotency_key": 12},
    {"user": "u" * 255}, {"service": "s" * 101}, {"job_id": "j" * 256}, {"checkout_id": "c" * 256},
    {"user": "nul\x00byte"}, {"idempotency_key": "nul\x00"}, {"idempotency_key": "\ud800"},
    {"occurred_at": "yesterday"}, {"occurred_at": "2026-01-01T00:00:00"}, {"unexpected": 1},
    {"checkout_id": "co-1"},
])
def test_invalid_fields_are_422(acme, change):
    body = {**GOOD, "idempotency_key": key(), **change}
    assert_error(acme["api"].post("/usage", body), 422, "invalid_request")
    assert not Event.objects.exists()


@pytest.mark.parametrize("missing", ["product", "kind", "quantity", "idempotency_key"])
def test_missing_fields_are_422(acme, missing):
    body = {**GOOD, "idempotency_key": key()}
    del body[missing]
    assert_error(acme["api"].post("/usage", body), 422, "invalid_request")


@pytest.mark.parametrize("raw", [b"{", b"", b"not json", b"[1, 2]", b"null", b"42", b"\xff\xfe", b"[" * 100000,
                                 b'{"quantity": 1e999}', b'{"quantity": NaN}'])
def test_malformed_bodies_are_422(acme, raw):
    assert_error(acme["api"].post("/usage", raw), 422, "invalid_request")


def test_huge_body_is_413(acme, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {**GOOD, "idempotency_key": key(), "user": "u" * 200, "job_id": "j" * 250, "service": "s" * 100,
            "pad": "x" * 2000}
    assert_error(acme["api"].post("/usage", body), 413, "payload_too_large")
    assert_error(acme["api"].post("/usage/batch", {"events": [body] * 3}), 413, "payload_too_large")


@pytest.mark.parametrize(("offset", "status"), [
    (timedelta(days=-36), 422), (timedelta(days=-34), 201), (timedelta(minutes=4), 201),
    (timedelta(minutes=6), 422), (timedelta(days=-36500), 422),
])
def test_occurred_at_window(acme, offset, status):
    at = timezone.now() + offset
    response = acme["api"].usage(occurred_at=at.isoformat())
    assert response.status_code == status, response.content
    if status == 422:
        assert_error(response, 422, "invalid_request")
    else:
        assert LedgerEntry.objects.get(kind=Kind.CONSUME).occurred_at == at


def test_occurred_at_at_the_edge_of_time_is_422(acme):
    assert_error(acme["api"].usage(occurred_at="0001-01-01T00:00:00+14:00"), 422, "invalid_request")
    assert_error(acme["api"].usage(occurred_at="9999-12-31T23:59:59-14:00"), 422, "invalid_request")


# -- checkout, return -----------------------------------------------------------------------------


def test_checkout_and_return(acme):
    api = acme["api"]
    out = api.usage(product="asset-pool", kind="checkout", quantity=4, checkout_id="co-1", user="user")
    assert out.status_code == 201, out.content
    assert (out.json()["available"], out.json()["outstanding"]) == (6, 4)
    assert_error(api.usage(product="asset-pool", kind="checkout", quantity=1, checkout_id="co-1"), 409,
                 "checkout_exists")
    assert_error(api.usage(product="asset-pool", kind="return", quantity=5, checkout_id="co-1"), 409,
                 "checkout_exceeded")
    assert_error(api.usage(product="asset-pool", kind="return", quantity=1, checkout_id="co-404"), 404,
                 "not_found")
    back = api.usage(product="asset-pool", kind="return", quantity=3, checkout_id="co-1")
    assert back.status_code == 201
    assert (back.json()["available"], back.json()["outstanding"]) == (9, 1)
    assert_error(api.usage(product="asset-pool", kind="checkout", quantity=11, checkout_id="co-2"), 409,
                 "insufficient_balance")


@pytest.mark.parametrize("body", [
    {"product": "asset-pool", "kind": "checkout", "quantity": 1},  # no checkout_id
    {"product": "asset-pool", "kind": "return", "quantity": 1},
    {"product": "asset-pool", "kind": "return", "quantity": 1, "checkout_id": "c", "user": "someone"},
    {"product": "asset-pool", "kind": "consume", "quantity": 1},  # returnable: checkout/return only
    {"product": "cloud-tokens", "kind": "checkout", "quantity": 1, "checkout_id": "c"},
    {"product": "cloud-tokens", "kind": "metered", "quantity": 1},  # not metered
])
def test_wrong_kind_for_product_is_422(acme, body):
    assert_error(acme["api"].post("/usage", {**body, "idempotency_key": key()}), 422, "invalid_request")


# -- metered ------------------------------------------------------------------------------------


def test_metered_twenty_minute_unit(acme):
    minutes = ProductFactory(code="render-minutes", metered=True, charge_unit_size=20, unit="units",
                             raw_unit="minutes")
    make_grant(acme["team"], minutes, 5)
    api = acme["api"]
    first = api.usage(product="render-minutes", kind="metered", quantity=10)
    assert first.status_code == 201
    assert (first.json()["charged"], first.json()["carried"], first.json()["available"]) == (0, 10, 5)
    second = api.usage(product="render-minutes", kind="metered", quantity=10)
    assert (second.json()["charged"], second.json()["carried"], second.json()["available"]) == (1, 0, 4)
    third = api.usage(product="render-minutes", kind="metered", quantity=45)
    assert (third.json()["charged"], third.json()["carried"], third.json()["available"]) == (2, 5, 2)


# -- refunds ------------------------------------------------------------------------------------


def test_job_refund_once(acme):
    api = acme["api"]
    api.usage(quantity=30, job_id="job-7")
    api.usage(quantity=20, job_id="job-7")
    k = key()
    refund = api.post("/jobs/job-7/refund", {"idempotency_key": k, "reason": "failed"})
    assert refund.status_code == 200, refund.content
    assert (refund.json()["refunded"], refund.json()["restored"]) == (50, 50)
    assert refund.json()["products"][0]["available"] == 150
    replay = api.post("/jobs/job-7/refund", {"idempotency_key": k, "reason": "failed"})
    assert replay.json() == refund.json() and replay["Idempotent-Replayed"] == "true"
    assert_error(api.post("/jobs/job-7/refund", {"idempotency_key": k, "reason": "cancelled"}), 409,
                 "idempotency_conflict")
    again = api.post("/jobs/job-7/refund", {"idempotency_key": key(), "reason": "cancelled"})
    assert again.status_code == 200 and again.json()["refunded"] == 0
    assert LedgerEntry.objects.filter(kind=Kind.REFUND).count() == 2


@pytest.mark.parametrize(("path", "body"), [
    ("/jobs/job-1/refund", {"idempotency_key": "k", "reason": "bored"}),
    ("/jobs/job-1/refund", {"reason": "failed"}),
    ("/jobs/job-1/refund", {"idempotency_key": "", "reason": "failed"}),
    ("/jobs/" + "j" * 256 + "/refund", {"idempotency_key": "k", "reason": "failed"}),
    ("/jobs/nul%00/refund", {"idempotency_key": "k", "reason": "failed"}),
])
def test_invalid_refunds_are_422(acme, path, body):
    assert_error(acme["api"].post(path, body), 422, "invalid_request")


def test_refund_of_unknown_job_is_404(acme):
    assert_error(acme["api"].post("/jobs/never-ran/refund", {"idempotency_key": key()}), 404, "not_found")


# -- tenancy ------------------------------------------------------------------------------------


def test_other_teams_key_never_sees_or_spends_or_refunds(acme):
    acme["api"].usage(quantity=10, job_id="acme-job")
    globex = acme["globex_api"]
    assert globex.get("/balances").json() == {"balances": []}
    assert_error(globex.usage(quantity=1), 404, "not_found")
    assert_error(globex.post("/jobs/acme-job/refund", {"idempotency_key": key()}), 404, "not_found")
    assert_error(globex.get("/usage", {"product": "cloud-tokens"}), 404, "not_found")
    # and acme's numbers did not move
    balance = acme["api"].get("/balances").json()["balances"]
    assert [(b["product"], b["available"]) for b in balance] == [("asset-pool", 10), ("cloud-tokens", 140)]


def test_idempotency_keys_are_per_team(acme):
    make_grant(acme["other"], acme["tokens"], 5)
    k = key()
    assert acme["api"].usage(quantity=3, k=k).status_code == 201
    other = acme["globex_api"].usage(quantity=2, k=k)  # a different body, but another team: no conflict
    assert other.status_code == 201 and other.json()["available"] == 3


# -- balances -----------------------------------------------------------------------------------


def test_balances_are_the_dashboard_numbers(acme):
    acme["api"].usage(quantity=10)
    body = acme["api"].get("/balances").json()
    tokens = next(b for b in body["balances"] if b["product"] == "cloud-tokens")
    card = next(b for b in team_balances(acme["team"]) if b.product.code == "cloud-tokens")
    assert (tokens["available"], tokens["total"], tokens["status"]) == (card.available, card.total, card.status)
    assert tokens["used_pct"] == 6.7 and Decimal(str(tokens["used_pct"])) == card.used_pct
    assert tokens["name"] == "Cloud tokens" and tokens["unit"] == "tokens"
    assert tokens["capacity_type"] == "exhaustible"
    assert tokens["ends_at"] is not None and tokens["refreshes_at"] is None
    assert b'"used_pct": 6.7' in acme["api"].get("/balances").content or b'"used_pct":6.7' in \
        acme["api"].get("/balances").content


def test_balances_low_and_empty(acme):
    acme["api"].usage(quantity=120)
    tokens = next(b for b in acme["api"].get("/balances").json()["balances"] if b["product"] == "cloud-tokens")
    assert (tokens["available"], tokens["status"], tokens["used_pct"]) == (30, "low", 80.0)
    acme["api"].usage(quantity=30)
    tokens = next(b for b in acme["api"].get("/balances").json()["balances"] if b["product"] == "cloud-tokens")
    assert (tokens["available"], tokens["status"], tokens["used_pct"]) == (0, "empty", 100.0)


def test_balances_with_huge_capacity_are_not_a_500(acme):
    make_grant(acme["team"], acme["tokens"], 10**12)
    assert acme["api"].usage(quantity=1).status_code == 201
    response = acme["api"].get("/balances")
    assert response.status_code == 200, response.content


# -- history ------------------------------------------------------------------------------------


def test_usage_history(acme):
    api = acme["api"]
    api.usage(quantity=10, service="rendering", user="user@example.com")
    api.usage(quantity=5, job_id="j1")
    api.post("/jobs/j1/refund", {"idempotency_key": key()})
    today = timezone.localdate()
    response = api.get("/usage", {"product": "cloud-tokens", "granularity": "day",
                                  "start": (today - timedelta(days=2)).isoformat(), "end": today.isoformat()})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["product"] == "cloud-tokens" and body["granularity"] == "day"
    assert len(body["series"]) == 3
    last = body["series"][-1]
    assert last["start"] == today.isoformat()
    assert (last["consumed"], last["refunded"], last["net_consumed"]) == (15, 5, 10)
    assert all(b["consumed"] == 0 for b in body["series"][:-1])
    month = api.get("/usage", {"product": "cloud-tokens", "granularity": "month"}).json()
    assert month["series"][-1]["consumed"] == 15 and month["end"] == today.isoformat()
    mine = api.get("/usage", {"product": "cloud-tokens", "user": "user@example.com"}).json()
    assert sum(b["consumed"] for b in mine["series"]) == 10
    shouted = api.get("/usage", {"product": "cloud-tokens", "user": "User@Example.com"}).json()
    assert sum(b["consumed"] for b in shouted["series"]) == 10  # an email in any case


def test_usage_history_of_returnable_capacity(acme):
    acme["api"].usage(product="asset-pool", kind="checkout", quantity=4, checkout_id="c1")
    acme["api"].usage(product="asset-pool", kind="return", quantity=3, checkout_id="c1")
    body = acme["api"].get("/usage", {"product": "asset-pool", "granularity": "week"}).json()
    assert body["series"][-1]["peak_checked_out"] == 4
    assert body["series"][-1]["returned"] == 3


@pytest.mark.parametrize("params", [
    {"product": "cloud-tokens", "granularity": "year"},
    {"product": "cloud-tokens", "start": "2026-02-30"},
    {"product": "cloud-tokens", "start": "2026-03-02", "end": "2026-03-01"},
    {"product": "cloud-tokens", "start": "2000-01-01", "end": "2026-01-01"},
    {"product": "cloud-tokens", "start": "9999-12-31", "end": "9999-12-31"},
    {"product": "cloud-tokens", "start": "0001-01-01"},
    {"product": "cloud-tokens", "user": "\x00"},
    {"granularity": "day"},
])
def test_invalid_history_queries_are_422(acme, params):
    assert_error(acme["api"].get("/usage", params), 422, "invalid_request")


def test_history_of_unknown_product_is_404(acme):
    assert_error(acme["api"].get("/usage", {"product": "nope"}), 404, "not_found")


# -- transport errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("get", "/usage/batch"), ("delete", "/usage"), ("put", "/balances"),
                                              ("get", "/jobs/j/refund")])
def test_wrong_method_is_405_json(acme, method, path):
    response = getattr(acme["api"].client, method)(BASE + path, headers=acme["api"].headers)
    assert_error(response, 405, "method_not_allowed")
    assert response["Allow"]


def test_unknown_endpoint_is_404_json(acme):
    assert_error(acme["api"].get("/nope"), 404, "not_found")
    assert_error(acme["api"].get("/"), 404, "not_found")
    assert_error(Client().post(BASE + "/usage/batch/extra"), 404, "not_found")


def test_rate_limit_per_key(acme, settings, own_cache):
    settings.API_RATE_LIMIT_PER_MINUTE = 3
    api = acme["api"]
    for _ in range(3):
        assert api.get("/balances").status_code == 200
    limited = api.get("/balances")
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert_error(api.usage(), 429, "rate_limited")
    assert not LedgerEntry.objects.filter(kind=Kind.CONSUME).exists()
    assert acme["globex_api"].get("/balances").status_code == 200  # another key has its own window


def test_rate_limit_counts_every_usage_request_once(acme, settings, own_cache):
    """Whatever path a POST /usage takes (the one-statement consume, a refusal, another
    kind, a bad body), it counts once against its key's minute."""
    settings.API_RATE_LIMIT_PER_MINUTE = 5
    api = acme["api"]
    assert api.usage().status_code == 201
    assert api.usage(quantity=10**9).status_code == 409
    assert api.usage(product="asset-pool", kind="checkout", checkout_id="c1").status_code == 201
    assert api.post("/usage", {"kind": "consume"}).status_code == 422
    assert api.get("/balances").status_code == 200
    assert_error(api.usage(), 429, "rate_limited")
    assert_error(api.post("/usage", {"kind": "consume"}), 429, "rate_limited")


def test_rate_limit_answers_401_to_a_bad_key_first(acme, settings, own_cache):
    """A bad key is 401 even past the limit of its (hashed) token: the limit never tells
    whether a key exists."""
    settings.API_RATE_LIMIT_PER_MINUTE = 1
    for _ in range(3):
        assert_error(ApiClient("nope").usage(), 401, "unauthorized")
        assert_error(ApiClient("nope").get("/balances"), 401, "unauthorized")


def test_rate_limit_zero_means_unlimited(acme, settings, own_cache):
    settings.API_RATE_LIMIT_PER_MINUTE = 0
    for _ in range(20):
        assert acme["api"].get("/balances").status_code == 200


def test_rate_limit_counts_in_postgresql(acme, settings, require_postgres, one_window):
    """On PostgreSQL the counter shared by all workers is in the database (usage_apirate):
    one row per key hash, its window and its count."""
    settings.API_RATE_LIMIT_PER_MINUTE = 3
    assert acme["api"].usage().status_code == 201  # (through the lane: counted in the consume's statement)
    assert acme["api"].get("/balances").status_code == 200
    assert acme["api"].usage(quantity=10**9).status_code == 409  # rolled back in the lane, counted by Django
    limited = acme["api"].get("/balances")
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited["Retry-After"]) <= 60
    with connection.cursor() as cursor:
        cursor.execute("SELECT win, n FROM usage_apirate WHERE key_hash = %s", [acme["api"].key_hash])
        assert cursor.fetchall() == [(int(time.time() // 60), 4)]


def test_rate_limit_counts_in_redis_when_configured(acme, settings, require_redis, one_window, monkeypatch):
    """Without PostgreSQL the counter shared by all workers is in the cache: the same fixed
    window, stored in Redis."""
    import redis

    monkeypatch.setattr(usage_api, "counts_in_database", lambda: False)

    prefix = f"test-{key()}"
    settings.CACHES = {"default": {"BACKEND": "capacity_portal.cache.RedisCache",
                                   "LOCATION": require_redis, "KEY_PREFIX": prefix}}
    settings.API_RATE_LIMIT_PER_MINUTE = 2
    assert acme["api"].get("/balances").status_code == 200
    assert acme["api"].get("/balances").status_code == 200
    limited = acme["api"].get("/balances")
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited["Retry-After"]) <= 60
    client = redis.Redis.from_url(require_redis)
    stored = client.keys(f"{prefix}:*api-rate:*")
    assert len(stored) == 1  # nothing else in Redis is touched
    assert 60 < client.ttl(stored[0]) <= 120 and int(client.get(stored[0])) == 3  # expires by itself


def test_rate_limit_fails_open_when_the_cache_is_down(acme, settings, caplog, monkeypatch):
    monkeypatch.setattr(usage_api, "counts_in_database", lambda: False)  # (the cache counts without PostgreSQL)
    settings.CACHES = {"default": {"BACKEND": "capacity_portal.cache.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    settings.API_RATE_LIMIT_PER_MINUTE = 1
    assert acme["api"].get("/balances").status_code == 200
    assert acme["api"].usage().status_code == 201
    assert "rate limit not applied" in caplog.text
