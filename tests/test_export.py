"""CSV export: streamed, named after team/product/range, and exactly the chart's data."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date, datetime, timedelta

import pytest
from django.http import StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone

from products.selectors import product_balance
from usage.history import resolve_range
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

from .conftest import key
from .factories import ProductFactory, make_grant


@pytest.fixture
def data(world, api_actor):
    team = world["team"]
    team.timezone = "Europe/Berlin"
    team.save()
    team.__dict__.pop("tzinfo", None)
    now = timezone.now()
    start = now - timedelta(days=400)
    make_grant(team, world["tokens"], 100_000, starts_at=start, days=800)
    make_grant(team, world["pool"], 1000, starts_at=start, days=800)
    api = ProductFactory(code="render-api", unit="units", metered=True, charge_unit_size=20, raw_unit="minutes")
    make_grant(team, api, 10_000, starts_at=start, days=800)
    common = dict(team=team, actor=api_actor)
    services = ["rendering", "simulation", "analysis"]
    for i in range(0, 120, 10):
        at = now - timedelta(days=i, hours=i % 7)
        usage_consume(**common, product=world["tokens"], quantity=10 + i, idempotency_key=key(),
                      user=f"u{i % 4}@example.com", service=services[i % 3], job_id=f"job-{i}", occurred_at=at)
        usage_metered(**common, product=api, quantity=7 + i, idempotency_key=key(), service=services[i % 2],
                      user=f"u{i % 2}@example.com", occurred_at=at)
        usage_checkout(**common, product=world["pool"], quantity=1 + i % 5, checkout_id=f"c{i}",
                       idempotency_key=key(), user=f"u{i % 3}@example.com", occurred_at=at)
        if i % 4:
            usage_return(**common, product=world["pool"], quantity=1, checkout_id=f"c{i}", idempotency_key=key(),
                         occurred_at=at + timedelta(minutes=30))
    job_refund(**common, job_id="job-20", idempotency_key=key())
    world["api"] = api
    return world


def get_csv(client, code, **params):
    url = reverse("usage:product_export", kwargs={"slug": "acme", "code": code})
    response = client.get(url, params)
    assert response.status_code == 200, response
    assert isinstance(response, StreamingHttpResponse)
    text = b"".join(response.streaming_content).decode()
    return response, list(csv.reader(io.StringIO(text)))


def get_figure(client, code, **params):
    url = reverse("usage:product_detail", kwargs={"slug": "acme", "code": code})
    body = client.get(url, params).content
    m = re.search(rb'<script type="application/json" data-plotly-figure="[^"]+">(.*?)</script>', body, re.S)
    return json.loads(m.group(1)), body.decode()


def trace(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


@pytest.fixture
def admin(client, data):
    client.force_login(data["members"]["primary_admin"])
    return client


@pytest.mark.parametrize("granularity", ["day", "week", "month"])
def test_csv_rows_equal_the_chart_data_exhaustible(admin, data, granularity):
    params = {"granularity": granularity, "range": "6m"}
    response, rows = get_csv(admin, "cloud-tokens", **params)
    fig, _ = get_figure(admin, "cloud-tokens", **params)
    header, body = rows[0], rows[1:]
    lead = {"day": ["day"], "week": ["week", "week_start"], "month": ["month"]}[granularity]
    assert header == lead + ["consumed", "refunded", "net_consumed", "available"]
    col = {name: [r[header.index(name)] for r in body] for name in header}
    consumed = trace(fig, "Consumed (tokens)")
    refunded = trace(fig, "Refunded (tokens)")
    balance = trace(fig, "Balance available (tokens)")
    if granularity == "month":
        x = [f"{m}-01" for m in col["month"]]
    else:
        x = col["week_start" if granularity == "week" else "day"]
    assert consumed["x"] == x
    assert consumed["y"] == [int(v) for v in col["consumed"]]
    assert refunded["customdata"] == [int(v) for v in col["refunded"]]
    assert refunded["y"] == [-int(v) for v in col["refunded"]]
    assert balance["y"] == [int(v) for v in col["available"]]
    # The balance line ends where the dashboard card stands (nothing is pending expiry here).
    assert int(col["available"][-1]) == product_balance(data["team"], data["tokens"]).available
    assert sum(int(v) for v in col["refunded"]) == 10 + 20  # the job-20 refund shows
    start, end, _ = resolve_range(team=data["team"], range_key="6m", start=None, end=None)
    suffix = {"day": "daily", "week": "weekly", "month": "monthly"}[granularity]
    assert response["Content-Disposition"] == (
        f'attachment; filename="acme_cloud-tokens_{start.isoformat()}_{end.isoformat()}_{suffix}.csv"'
    )
    assert response["Content-Type"] == "text/csv; charset=utf-8"


def test_weekly_csv_names_iso_weeks(admin, data):
    _, rows = get_csv(admin, "cloud-tokens", granularity="week", range="custom", **{"from": "2025-12-22",
                                                                                    "to": "2026-01-11"})
    assert [r[:2] for r in rows[1:]] == [["2025-W52", "2025-12-22"], ["2026-W01", "2025-12-29"],
                                         ["2026-W02", "2026-01-05"]]


def test_csv_rows_equal_the_chart_data_returnable(admin, data):
    _, rows = get_csv(admin, "asset-pool", range="3m")
    fig, _ = get_figure(admin, "asset-pool", range="3m")
    header, body = rows[0], rows[1:]
    assert header == ["day", "peak_checked_out", "checked_out", "returned"]
    assert trace(fig, "Peak checked out (assets)")["x"] == [r[0] for r in body]
    assert trace(fig, "Peak checked out (assets)")["y"] == [int(r[1]) for r in body]
    assert trace(fig, "Returned (assets)")["y"] == [int(r[3]) for r in body]


def test_csv_rows_equal_the_chart_data_metered(admin, data):
    _, rows = get_csv(admin, "render-api", range="3m", granularity="week")
    fig, _ = get_figure(admin, "render-api", range="3m", granularity="week")
    header, body = rows[0], rows[1:]
    assert header == ["week", "week_start", "raw_usage", "consumed", "refunded", "net_consumed", "available"]
    assert trace(fig, "Raw usage (minutes)")["y"] == [int(r[2]) for r in body]
    assert trace(fig, "Consumed (units)")["y"] == [int(r[3]) for r in body]


@pytest.mark.parametrize("by", ["service", "user"])
@pytest.mark.parametrize("code", ["cloud-tokens", "asset-pool", "render-api"])
def test_breakdown_csv_equals_the_table_and_bar_chart(admin, data, by, code):
    params = {"view": by, "range": "12m"}
    response, rows = get_csv(admin, code, **params)
    fig, body = get_figure(admin, code, **params)
    header, rows = rows[0], rows[1:]
    assert header[0] == by
    bar = fig["data"][0]
    assert bar["y"][::-1] == [r[0] for r in rows]  # bars are drawn bottom-up
    value_col = "checked_out" if code == "asset-pool" else "net_consumed"
    assert bar["x"][::-1] == [int(r[header.index(value_col)]) for r in rows]
    # The HTML table shows the same rows, same order.
    table = body.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    shown = re.findall(r'<th scope="row">([^<]*)</th>', table)
    assert shown == [r[0] for r in rows]
    assert response["Content-Disposition"].endswith(f'_by-{by}.csv"')


def test_format_csv_on_the_details_url_is_the_same_export(admin, data):
    url = reverse("usage:product_detail", kwargs={"slug": "acme", "code": "cloud-tokens"})
    a = admin.get(url, {"format": "csv", "view": "user", "range": "3m"})
    _, rows = get_csv(admin, "cloud-tokens", view="user", range="3m")
    assert list(csv.reader(io.StringIO(b"".join(a.streaming_content).decode()))) == rows


def test_export_link_on_the_page_matches_the_view(admin, data):
    _, body = get_figure(admin, "cloud-tokens", view="service", range="12m")
    m = re.search(r'<a class="button" href="([^"]+)" download="([^"]+)"', body)
    assert m.group(1).replace("&amp;", "&").endswith("?view=service&granularity=day&range=12m")
    assert m.group(2).startswith("acme_cloud-tokens_") and m.group(2).endswith("_by-service.csv")


def test_custom_range_filename(admin, data):
    response, rows = get_csv(admin, "cloud-tokens", range="custom", **{"from": "2026-09-01", "to": "2026-11-20"})
    assert response["Content-Disposition"] == (
        'attachment; filename="acme_cloud-tokens_2026-09-01_2026-11-20_daily.csv"'
    )
    assert rows[1][0] == "2026-09-01" and rows[-1][0] == "2026-11-20"
    assert len(rows) == 1 + (date(2026, 11, 20) - date(2026, 9, 1)).days + 1


def test_export_uses_the_teams_local_days(admin, data, api_actor):
    # 23:30 in Berlin on Jan 5 is 22:30 UTC: the row is Jan 5.
    berlin = data["team"].tzinfo
    usage_consume(team=data["team"], product=data["tokens"], quantity=12345, idempotency_key=key(),
                  actor=api_actor, occurred_at=datetime(2026, 1, 5, 23, 30, tzinfo=berlin))
    _, rows = get_csv(admin, "cloud-tokens", range="custom", **{"from": "2026-01-05", "to": "2026-01-06"})
    assert rows[1][:2] == ["2026-01-05", "12345"] and rows[2][1] == "0"
