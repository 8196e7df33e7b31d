"""Usage pages: a product's usage details (admins), its CSV export, and "My usage" (any member).

Every view resolves its team first with ``get_team_for_user`` (404 to outsiders,
403 to the wrong role) and reads history through ``usage.history`` only.
"""

from __future__ import annotations

import csv
import html
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.utils.safestring import mark_safe

from products.models import Product, TeamProduct
from products.selectors import held_product_balance
from teams.access import get_team_for_user
from teams.models import Team

from . import charts
from .history import InvalidRange, resolve_range, usage_breakdown, usage_series

TABS = (("usage", "Usage"), ("service", "By service"), ("user", "By user"))
GRANULARITY_TABS = (("day", "Daily"), ("week", "Weekly"), ("month", "Monthly"))
RANGES = (("month", "This month"), ("3m", "Last 3 months"), ("6m", "Last 6 months"), ("12m", "Last 12 months"))
DEFAULT_RANGE = "3m"
FILE_SUFFIX = {"day": "daily", "week": "weekly", "month": "monthly", "service": "by-service", "user": "by-user"}


@dataclass
class UsageQuery:
    """What the page shows, from the query string (names: view, granularity, range, from, to)."""

    tab: str
    granularity: str
    range_key: str
    start: date | None
    end: date | None
    label: str
    raw_from: str
    raw_to: str
    error: str = ""

    def params(self, **overrides) -> dict:
        params = {"view": self.tab, "granularity": self.granularity, "range": self.range_key}
        if self.range_key == "custom":
            params.update({"from": self.raw_from, "to": self.raw_to})
        params.update(overrides)
        if params.get("range") != "custom":
            params.pop("from", None)
            params.pop("to", None)
        return params


def granularities_for(product: Product) -> tuple[str, ...]:
    # Returnable capacity is a level, shown per day (peak); exhaustible use adds up per week/month.
    return ("day",) if product.is_returnable else ("day", "week", "month")


def _parse_date(raw: str, name: str) -> date | None:
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidRange(f"{name} must be a date like 2026-01-31.") from None


def parse_query(request: HttpRequest, team: Team, product: Product | None, *, tabs=TABS) -> UsageQuery:
    """Read the query string; bad input becomes ``error`` (shown to the user), never an exception."""
    get = request.GET
    tab = get.get("view", "usage")
    granularity = get.get("granularity", "day")
    range_key = get.get("range", DEFAULT_RANGE)
    raw_from, raw_to = get.get("from", "").strip(), get.get("to", "").strip()
    allowed = granularities_for(product) if product is not None else ("day", "week", "month")
    query = UsageQuery(tab=tab, granularity=granularity, range_key=range_key, start=None, end=None, label="",
                       raw_from=raw_from[:20], raw_to=raw_to[:20])
    try:
        if tab not in dict(tabs):
            raise InvalidRange(f"Unknown view {tab[:30]!r}: choose one of {', '.join(dict(tabs).values())}.")
        if granularity not in allowed:
            raise InvalidRange(
                "This product has a daily view only." if len(allowed) == 1
                else "Granularity must be daily, weekly or monthly."
            )
        query.start, query.end, query.label = resolve_range(
            team=team, range_key=range_key,
            start=_parse_date(raw_from, "From"), end=_parse_date(raw_to, "To"),
        )
    except InvalidRange as exc:
        query.error = exc.message
    if query.error:  # keep the page's links valid whatever was typed
        query.tab = tab if tab in dict(tabs) else "usage"
        query.granularity = granularity if granularity in allowed else "day"
        query.range_key = range_key if range_key in dict(RANGES) or range_key == "custom" else DEFAULT_RANGE
    return query


def _team_product(team: Team, code: str) -> Product:
    """A product the team holds (has ever been granted); 404 otherwise."""
    held = TeamProduct.objects.for_team(team).select_related("product").filter(product__code=code).first()
    if held is None:
        raise Http404("No such product for this team.")
    return held.product


def _table(team: Team, product: Product, query: UsageQuery, *, user: str | None = None) -> charts.Table:
    common = dict(team=team, product=product, start=query.start, end=query.end, user=user)
    if query.tab == "usage":
        buckets = usage_series(**common, granularity=query.granularity)
        return charts.series_table(product, buckets, query.granularity)
    rows = usage_breakdown(**common, by=query.tab)
    return charts.breakdown_table(product, rows, query.tab)


def _figure(product: Product, table: charts.Table, query: UsageQuery):
    if query.tab == "usage":
        return charts.series_figure(product, table, query.granularity)
    return charts.breakdown_figure(product, table, query.tab)


def display_rows(table: charts.Table) -> list[list[str]]:
    return [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in table.rows]


def rows_html(table: charts.Table) -> str:
    """The table body, built here in one pass: a year of days through the template engine
    cost ~25 ms. Whole numbers print with thousands separators (digits and commas: nothing
    to escape); everything else is escaped with the stdlib's escape (~20x Django's)."""
    esc = html.escape

    def cell(v) -> str:
        return f"<td>{v:,}</td>" if isinstance(v, int) else f"<td>{esc(str(v))}</td>"

    def generic(row) -> str:
        return f'<tr><th scope="row">{esc(str(row[0]))}</th>' + "".join([cell(v) for v in row[1:]]) + "</tr>"

    # Rows whose values are all whole numbers (nearly all) go through one format string;
    # ",d" refuses anything else (text, decimals), and that row is built cell by cell.
    width = len(table.labels)
    all_ints = '<tr><th scope="row">{}</th>' + "<td>{:,d}</td>" * (width - 1) + "</tr>"
    # A series' first column is its bucket (an ISO date, week or month we wrote: nothing
    # to escape); a breakdown's is a service or user name, escaped.
    bucket_first = table.columns[0] in charts.BUCKET_LABEL
    out = []
    for row in table.rows:
        try:
            if len(row) != width:
                raise ValueError
            out.append(all_ints.format(*row) if bucket_first else all_ints.format(esc(str(row[0])), *row[1:]))
        except (ValueError, TypeError):  # TypeError: None
            out.append(generic(row))
    return mark_safe("\n".join(out))  # noqa: S308 (every value is escaped or a formatted int)


def links(base_url: str, query: UsageQuery, param: str, choices, current: str) -> list[tuple[str, str, bool]]:
    """(name, url, is current) of each choice of ``param``, the rest of the query kept."""
    return [(name, f"{base_url}?{urlencode(query.params(**{param: key}))}", key == current) for key, name in choices]


def export_filename(team: Team, product: Product, query: UsageQuery) -> str:
    suffix = FILE_SUFFIX[query.granularity if query.tab == "usage" else query.tab]
    return f"{team.slug}_{product.code}_{query.start.isoformat()}_{query.end.isoformat()}_{suffix}.csv"


@login_required
def product_detail(request: HttpRequest, slug: str, code: str) -> HttpResponse:
    team, membership = get_team_for_user(request, slug)
    balance = held_product_balance(team, code)  # the header's numbers, and the product (404 if not held)
    if balance is None:
        raise Http404("No such product for this team.")
    product = balance.product
    if request.GET.get("format") == "csv":
        return _export(team, product, parse_query(request, team, product))
    query = parse_query(request, team, product)
    base_url = reverse("usage:product_detail", kwargs={"slug": team.slug, "code": product.code})
    context = {
        "team": team, "membership": membership, "product": product, "query": query, "base_url": base_url,
        "balance": balance,
        "table": None, "figure": None,
    }
    if not query.error:
        table = _table(team, product, query)
        context["table"] = table
        context["rows_html"] = rows_html(table)
        if not table.is_empty:
            fig = _figure(product, table, query)
            context["figure"], context["caption"] = charts.figure_json(fig), charts.caption(fig)
        export_url = reverse("usage:product_export", kwargs={"slug": team.slug, "code": product.code})
        context["export_url"] = f"{export_url}?{urlencode(query.params())}"
        context["export_filename"] = export_filename(team, product, query)
    context["tabs"] = links(base_url, query, "view", TABS, query.tab)
    allowed = granularities_for(product)
    context["granularity_tabs"] = links(base_url, query, "granularity",
                                        [(k, n) for k, n in GRANULARITY_TABS if k in allowed], query.granularity)
    context["range_tabs"] = links(base_url, query, "range", RANGES, query.range_key)
    context["granularity_name"] = dict(GRANULARITY_TABS)[query.granularity]
    template = "usage/product_detail.html#chart" if request.htmx else "usage/product_detail.html"
    status = 400 if query.error and not request.htmx else 200
    response = render(request, template, context, status=status)
    patch_vary_headers(response, ["HX-Request"])
    return response


@login_required
def product_export(request: HttpRequest, slug: str, code: str) -> HttpResponse:
    team, _ = get_team_for_user(request, slug)
    product = _team_product(team, code)
    return _export(team, product, parse_query(request, team, product))


class _Echo:
    """A write-only file for csv.writer: hands each line to the streaming response."""

    def write(self, value: str) -> str:
        return value


def _export(team: Team, product: Product, query: UsageQuery) -> HttpResponse:
    if query.error:
        return HttpResponse(f"{query.error}\n", status=400, content_type="text/plain; charset=utf-8")
    table = _table(team, product, query)
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(table.columns)
        for row in table.rows:
            yield writer.writerow(row)

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{export_filename(team, product, query)}"'
    return response


# -- My usage ----------------------------------------------------------------------------

MY_TABS = (("usage", "Usage"),)


def usage_identifier(user) -> str:
    """What services send as ``user`` for this person: normally their email."""
    return user.email or user.get_username()


@login_required
def my_usage(request: HttpRequest, slug: str) -> HttpResponse:
    """Any member's own usage, per product: never anyone else's (filtered by their identifier)."""
    team, membership = get_team_for_user(request, slug, admin=False)
    query = parse_query(request, team, None, tabs=MY_TABS)
    identifier = usage_identifier(request.user)
    held = TeamProduct.objects.for_team(team).select_related("product").order_by("product__name", "product_id")
    sections = []
    if not query.error:
        for tp in held:
            product = tp.product
            granularity = query.granularity if query.granularity in granularities_for(product) else "day"
            buckets = usage_series(team=team, product=product, start=query.start, end=query.end,
                                   granularity=granularity, user=identifier)
            table = charts.series_table(product, buckets, granularity, per_user=True)
            services = charts.breakdown_table(
                product,
                usage_breakdown(team=team, product=product, start=query.start, end=query.end, by="service",
                                user=identifier),
                "service",
            )
            figure = caption = None
            if not table.is_empty:
                fig = charts.series_figure(product, table, granularity)
                figure, caption = charts.figure_json(fig), charts.caption(fig)
            sections.append({
                "product": product, "granularity": granularity, "table": table, "figure": figure,
                "caption": caption,
                "services": services, "service_rows": display_rows(services),
                "totals": _totals(product, buckets),
            })
    base_url = reverse("usage:my_usage", kwargs={"slug": team.slug})
    context = {
        "team": team, "membership": membership, "query": query, "base_url": base_url, "sections": sections,
        "identifier": identifier, "is_admin": membership.is_admin,
        "granularity_tabs": links(base_url, query, "granularity", GRANULARITY_TABS, query.granularity),
        "range_tabs": links(base_url, query, "range", RANGES, query.range_key),
    }
    template = "usage/my_usage.html#panel" if request.htmx else "usage/my_usage.html"
    response = render(request, template, context, status=400 if query.error and not request.htmx else 200)
    patch_vary_headers(response, ["HX-Request"])
    return response


def _totals(product: Product, buckets) -> list[tuple[str, int]]:
    if product.is_returnable:
        return [("Checked out", sum(b.checked_out for b in buckets)),
                ("Returned", sum(b.returned for b in buckets))]
    totals = [("Consumed", sum(b.consumed for b in buckets)), ("Refunded", sum(b.refunded for b in buckets))]
    if product.metered:
        totals.insert(0, (f"Raw usage ({charts.raw_unit(product)})", sum(b.raw_usage for b in buckets)))
    return totals
