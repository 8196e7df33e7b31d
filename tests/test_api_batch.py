"""POST /api/v1/usage/batch: one result per event, savepoint per event, 413 above the limit."""

from __future__ import annotations

import pytest

from usage.models import Event, Kind, LedgerEntry

from .conftest import key
from .factories import ProductFactory, make_grant
from .test_api import assert_error, setup_acme

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(world):
    return setup_acme(world)


def ev(quantity=1, product="cloud-tokens", kind="consume", **extra):
    return {"product": product, "kind": kind, "quantity": quantity, "idempotency_key": extra.pop("k", key()),
            **extra}


def test_mixed_results_each_event_its_own(acme):
    events = [
        ev(100),                                    # 0 ok: 50 left
        ev(60),                                     # 1 insufficient: nothing written
        ev(0),                                      # 2 invalid
        ev(1, product="nope"),                      # 3 unknown product
        ev(50),                                     # 4 ok: 0 left
        ev(2, product="asset-pool", kind="checkout", checkout_id="c1"),  # 5 ok
        ev(3, product="asset-pool", kind="return", checkout_id="c1"),    # 6 exceeds the checkout
        {"product": "cloud-tokens"},                # 7 missing fields
        "not an object",                            # 8
    ]
    response = acme["api"].post("/usage/batch", {"events": events})
    assert response.status_code == 200, response.content
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(events)))
    assert [r["status"] for r in results] == [201, 409, 422, 404, 201, 201, 409, 422, 422]
    assert results[0]["body"]["available"] == 50 and results[4]["body"]["available"] == 0
    assert results[1]["error"]["code"] == "insufficient_balance"
    assert results[3]["error"]["code"] == "not_found"
    assert results[6]["error"]["code"] == "checkout_exceeded"
    assert results[7]["error"]["code"] == "invalid_request"
    assert sum(-e.delta for e in LedgerEntry.objects.filter(kind=Kind.CONSUME)) == 150
    assert Event.objects.count() == 3  # the rejected events left nothing behind


def test_batch_replay_and_conflict_per_event(acme):
    first = [ev(5, k="a"), ev(6, k="b")]
    out = acme["api"].post("/usage/batch", {"events": first}).json()["results"]
    assert [r["replayed"] for r in out] == [False, False]
    again = acme["api"].post("/usage/batch", {"events": [first[1], ev(7, k="a"), ev(8, k="c")]}).json()["results"]
    assert again[0]["status"] == 201 and again[0]["replayed"] and again[0]["body"] == out[1]["body"]
    assert again[1]["status"] == 409 and again[1]["error"]["code"] == "idempotency_conflict"
    assert again[2]["status"] == 201 and again[2]["body"]["available"] == 150 - 5 - 6 - 8
    # a single request replays an event written by a batch
    single = acme["api"].post("/usage", first[0])
    assert single.status_code == 201 and single.json() == out[0]["body"]
    assert single["Idempotent-Replayed"] == "true"
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 3


def test_duplicate_key_inside_one_batch_replays(acme):
    same = ev(4, k="dup")
    results = acme["api"].post("/usage/batch", {"events": [same, same, ev(5, k="dup")]}).json()["results"]
    assert [r["status"] for r in results] == [201, 201, 409]
    assert results[1]["replayed"] and results[1]["body"] == results[0]["body"]
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1


def test_metered_inside_a_batch_carries(acme):
    ProductFactory(code="render-minutes", metered=True, charge_unit_size=20, unit="units")
    make_grant(acme["team"], ProductFactory(code="render-minutes"), 3)
    events = [ev(10, product="render-minutes", kind="metered") for _ in range(3)]
    results = acme["api"].post("/usage/batch", {"events": events}).json()["results"]
    assert [(r["body"]["charged"], r["body"]["carried"]) for r in results] == [(0, 10), (1, 0), (0, 10)]


def test_1000_events_ok_1001_is_413(acme):
    make_grant(acme["team"], acme["tokens"], 10_000)
    ok = acme["api"].post("/usage/batch", {"events": [ev(1) for _ in range(1000)]})
    assert ok.status_code == 200
    assert {r["status"] for r in ok.json()["results"]} == {201}
    assert ok.json()["results"][-1]["body"]["available"] == 10_150 - 1000
    too_many = acme["api"].post("/usage/batch", {"events": [ev(1) for _ in range(1001)]})
    assert_error(too_many, 413, "payload_too_large")
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1000


@pytest.mark.parametrize("body", [{}, {"events": "x"}, {"events": [1], "extra": True}, {"events": None}, []])
def test_malformed_batches_are_422(acme, body):
    assert_error(acme["api"].post("/usage/batch", body), 422, "invalid_request")


def test_empty_batch(acme):
    response = acme["api"].post("/usage/batch", {"events": []})
    assert response.status_code == 200 and response.json() == {"results": []}


def test_batch_is_team_scoped(acme):
    results = acme["globex_api"].post("/usage/batch", {"events": [ev(1)]}).json()["results"]
    assert results[0]["status"] == 404
    assert not LedgerEntry.objects.filter(kind=Kind.CONSUME).exists()
