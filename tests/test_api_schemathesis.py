"""Property-based run over the API's own OpenAPI schema: no input produces a 500.

Schemathesis generates valid and invalid requests for every operation (positive and
negative modes) and sends them through the WSGI app with a valid Bearer key of a
team that holds products, so requests reach the services and not only the 401 path.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings

from capacity_portal.wsgi import application
from products.models import CapacityType
from teams.services import api_key_create
from tests.factories import ProductFactory, TeamFactory, make_grant

schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)
schema.config.generation.update(modes=["positive", "negative"], max_examples=40, deterministic=True)


@pytest.fixture
def keep_connection():
    """As django.test.Client does: a request through the raw WSGI app must not close the
    test's database connection (that would end the test transaction)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def bearer(db, settings, keep_connection):
    settings.API_RATE_LIMIT_PER_MINUTE = 0
    team = TeamFactory(slug="fuzz")
    make_grant(team, ProductFactory(code="cloud-tokens"), 10**6)
    make_grant(team, ProductFactory(code="asset-pool", capacity_type=CapacityType.RETURNABLE), 1000)
    make_grant(team, ProductFactory(code="render-minutes", metered=True, charge_unit_size=20), 1000)
    return {"Authorization": f"Bearer {api_key_create(team=team, name='fuzz')[1]}"}


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@pytest.mark.django_db
def test_no_input_is_a_server_error(case, bearer):
    aim_at_held_products(case)
    response = case.call(headers=bearer)
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])
    content_type = {k.lower(): v for k, v in response.headers.items()}["content-type"]
    assert "application/json" in str(content_type), (response.status_code, content_type)


HELD = ("cloud-tokens", "asset-pool", "render-minutes")


def aim_at_held_products(case) -> None:
    """Random product codes almost always 404; point most generated requests at the team's
    real products so they reach the services (deterministically, by the generated data)."""

    def aim(item) -> None:
        if isinstance(item, dict) and isinstance(item.get("product"), str):
            pick = len(item["product"]) % (len(HELD) + 1)
            if pick < len(HELD):
                item["product"] = HELD[pick]

    if isinstance(case.body, dict):
        aim(case.body)
        for event in case.body.get("events") or [] if isinstance(case.body.get("events"), list) else []:
            aim(event)
    if isinstance(case.query, dict):
        aim(case.query)
