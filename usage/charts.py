"""Tables and Plotly figures of usage history (presentation only: no queries).

A page shows a table and a chart built from the *same* :class:`Table`, and the CSV
export writes that table, so the chart, the table and the CSV never disagree.
Figures are built server-side as Plotly figure JSON (:class:`Figure`, a small
dict builder with the few ``plotly.graph_objects.Figure`` methods we use: building a
``go.Figure`` validates every property and cost ~90 ms a chart) and embedded in the
page; static/usage/charts.js draws them with the plotly.js shipped in the Python package.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from operator import itemgetter

from products.models import Product

from .history import BreakdownRow, Bucket

CONSUMED = "#0b5cad"
REFUNDED = "#d97706"
CUMULATIVE = "#1f7a3a"
RETURNED = "#7c3aed"
RAW = "#0f766e"

BUCKET_LABEL = {"day": "day", "week": "week", "month": "month"}
HOVER_DATE = {"day": "%a %b %-d, %Y", "week": "Week of %b %-d, %Y", "month": "%B %Y"}


@dataclass
class Table:
    """Column names and rows (first column: the bucket or the breakdown key)."""

    columns: list[str]
    labels: list[str]
    rows: list[list] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not any(any(value for value in row[self.first_value:]) for row in self.rows)

    @property
    def first_value(self) -> int:
        return 2 if self.columns[:2] == ["week", "week_start"] else 1

    def label(self, name: str) -> str:
        return self.labels[self.columns.index(name)]

    def column(self, name: str) -> list:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def bucket_key(bucket: Bucket, granularity: str) -> str:
    if granularity == "week":
        year, week, _ = bucket.start.isocalendar()
        return f"{year}-W{week:02d}"
    if granularity == "month":
        return bucket.start.strftime("%Y-%m")
    return bucket.start.isoformat()


def series_table(product: Product, buckets: list[Bucket], granularity: str, *, per_user: bool = False) -> Table:
    """The usage tab's rows: per bucket, what the chart draws.

    ``per_user``: the series is one person's, whose level is their end-of-day holding.
    """
    first = [BUCKET_LABEL[granularity]] + (["week_start"] if granularity == "week" else [])
    first_labels = [BUCKET_LABEL[granularity].title()] + (["Week starts"] if granularity == "week" else [])

    def lead(bucket: Bucket) -> list:
        if granularity == "day":
            return [bucket.start.isoformat()]
        key = bucket_key(bucket, granularity)
        return [key, bucket.start.isoformat()] if granularity == "week" else [key]

    if product.is_returnable:
        table = Table(first + ["peak_checked_out", "checked_out", "returned"],
                      first_labels + [f"{'Held at day end' if per_user else 'Peak checked out'} ({product.unit})",
                                      f"Checked out ({product.unit})", f"Returned ({product.unit})"])
        for b in buckets:
            table.rows.append(lead(b) + [b.peak_checked_out, b.checked_out, b.returned])
        return table
    # The whole team's series shows the balance left at the end of each bucket; one
    # person's series (My usage) shows their cumulative use instead.
    last = "cumulative_net" if per_user else "available"
    columns = ["consumed", "refunded", "net_consumed", last]
    labels = [f"Consumed ({product.unit})", f"Refunded ({product.unit})", f"Net used ({product.unit})",
              f"Cumulative net used ({product.unit})" if per_user else f"Available at end ({product.unit})"]
    if product.metered:
        columns.insert(0, "raw_usage")
        labels.insert(0, f"Raw usage ({raw_unit(product)})")
    table = Table(first + columns, first_labels + labels)
    # Every value of a bucket in a fixed order, the table's columns picked by position
    # (a year of days: no dict per row).
    pick = itemgetter(*[_SERIES_VALUES.index(c) for c in columns])
    rows = table.rows
    running = 0
    daily = granularity == "day"  # (a year of days: the bucket's lead inline)
    for b in buckets:
        net = b.consumed - b.refunded
        running += net
        values = (b.raw_usage, b.consumed, b.refunded, net, running, b.available if b.available is not None else 0)
        rows.append([b.start.isoformat(), *pick(values)] if daily else [*lead(b), *pick(values)])
    return table


_SERIES_VALUES = ("raw_usage", "consumed", "refunded", "net_consumed", "cumulative_net", "available")


def breakdown_table(product: Product, rows: list[BreakdownRow], by: str) -> Table:
    """The by-service / by-user tab's rows ('' keys are shown as '(none)')."""
    title = "Service" if by == "service" else "User"
    if product.is_returnable:
        table = Table([by, "checked_out", "returned"],
                      [title, f"Checked out ({product.unit})", f"Returned ({product.unit})"])
        for r in rows:
            table.rows.append([r.key or "(none)", r.checked_out, r.returned])
        return table
    columns = ["consumed", "refunded", "net_consumed"]
    labels = [f"Consumed ({product.unit})", f"Refunded ({product.unit})", f"Net used ({product.unit})"]
    if product.metered:
        columns.insert(0, "raw_usage")
        labels.insert(0, f"Raw usage ({raw_unit(product)})")
    table = Table([by] + columns, [title] + labels)
    for r in rows:
        values = {"raw_usage": r.raw_usage, "consumed": r.consumed, "refunded": r.refunded,
                  "net_consumed": r.net_consumed}
        table.rows.append([r.key or "(none)"] + [values[c] for c in columns])
    return table


def raw_unit(product: Product) -> str:
    return product.raw_unit or "raw units"


# -- figures -----------------------------------------------------------------------------

# The look of Plotly's "plotly_white" template, spelled out (plotly.js has no named templates).
WHITE = {
    "paper_bgcolor": "white",
    "plot_bgcolor": "white",
    "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A"],
    "font": {"color": "#2a3f5f"},
    "hoverlabel": {"align": "left"},
    "xaxis": {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "ticks": "", "zerolinecolor": "#EBF0F8",
              "zerolinewidth": 2, "automargin": True, "title": {"standoff": 15}},
    "yaxis": {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "ticks": "", "zerolinecolor": "#EBF0F8",
              "zerolinewidth": 2, "automargin": True, "title": {"standoff": 15}},
}


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = json.loads(json.dumps(value)) if isinstance(value, dict) else value
    return into


def _magic(props: dict) -> dict:
    """Plotly's magic underscores: marker_pattern_shape="/" -> {"marker": {"pattern": {"shape": "/"}}}."""
    out: dict = {}
    for key, value in props.items():
        path = key.split("_")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


class Figure:
    """Plotly figure JSON: ``{"data": [...], "layout": {...}}``, built without validation."""

    def __init__(self) -> None:
        self.data: list[dict] = []
        self.layout: dict = {}

    def add_bar(self, **props) -> None:
        self.data.append({"type": "bar", **_magic(props)})

    def add_scatter(self, **props) -> None:
        self.data.append({"type": "scatter", **_magic(props)})

    def update_layout(self, template: str | None = None, **props) -> None:
        if template == "plotly_white":
            _merge(self.layout, WHITE)
        _merge(self.layout, _magic(props))

    def update_xaxes(self, **props) -> None:
        _merge(self.layout.setdefault("xaxis", {}), _magic(props))

    def to_dict(self) -> dict:
        return {"data": self.data, "layout": self.layout}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))



def _layout(fig: Figure, *, title: str, ytitle: str, xtitle: str | None = None, y2title: str | None = None,
            date_axis: bool = True) -> None:
    fig.update_layout(
        template="plotly_white",
        # The caption is an HTML heading above the chart (it would collide with the legend on a phone).
        meta={"caption": title},
        margin={"l": 64, "r": 64 if y2title else 24, "t": 16, "b": 56},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1},
        hovermode="x unified" if date_axis else "closest",
        autosize=True,
        height=380,
        font={"family": 'system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif', "size": 13},
        yaxis={"title": {"text": ytitle}, "rangemode": "tozero", "tickformat": ",d", "separatethousands": True},
        barmode="relative",
    )
    if xtitle:
        fig.update_xaxes(title_text=xtitle)
    if date_axis:
        fig.update_xaxes(type="date")
    if y2title:
        fig.update_layout(yaxis2={"title": {"text": y2title}, "overlaying": "y", "side": "right",
                                  "rangemode": "tozero", "tickformat": ",d", "showgrid": False})


def series_figure(product: Product, table: Table, granularity: str) -> Figure:
    """Exhaustible: consumed (bars), refunds (negative bars), balance available (line; a
    person's cumulative use on My usage).
    Metered adds raw usage (line, right axis). Returnable: peak checked out and returns."""
    x = table.column("week_start") if granularity == "week" else table.column(table.columns[0])
    if granularity == "month":
        x = [f"{m}-01" for m in x]
    when = HOVER_DATE[granularity]
    xtitle = {"day": "Day", "week": "ISO week (starting Monday)", "month": "Month"}[granularity]
    xtitle += " (team time)"
    unit = product.unit
    fig = Figure()
    if product.is_returnable:
        fig.add_bar(x=x, y=table.column("peak_checked_out"), name=table.label("peak_checked_out"),
                    marker_color=CONSUMED, hovertemplate=f"%{{y:,}} {unit} out<extra></extra>")
        fig.add_scatter(x=x, y=table.column("returned"), name=f"Returned ({unit})", mode="lines+markers",
                        line={"color": RETURNED, "width": 2}, marker={"size": 5},
                        hovertemplate=f"%{{y:,}} {unit} returned<extra></extra>")
        _layout(fig, title=f"Checked out and returned per {granularity}", ytitle=unit.capitalize(), xtitle=xtitle)
        fig.update_layout(barmode="group")
    else:
        consumed = table.column("consumed")
        fig.add_bar(x=x, y=consumed, name=f"Consumed ({unit})", marker_color=CONSUMED,
                    hovertemplate=f"%{{y:,}} {unit} consumed<extra></extra>")
        refunds = table.column("refunded")
        fig.add_bar(x=x, y=[-r for r in refunds], customdata=refunds, name=f"Refunded ({unit})",
                    marker_color=REFUNDED, marker_pattern_shape="/",
                    hovertemplate=f"%{{customdata:,}} {unit} refunded<extra></extra>")
        y2 = None
        right = table.column("raw_usage" if product.metered else table.columns[-1])  # (the right axis' line)
        if product.metered:
            y2 = f"Raw usage ({raw_unit(product)})"
            fig.add_scatter(x=x, y=right, name=y2, yaxis="y2", mode="lines+markers",
                            line={"color": RAW, "width": 2}, marker={"size": 5},
                            hovertemplate=f"%{{y:,}} {raw_unit(product)}<extra></extra>")
        elif "available" in table.columns:
            y2 = f"Balance available ({unit})"
            fig.add_scatter(x=x, y=right, name=y2, yaxis="y2", mode="lines",
                            line={"color": CUMULATIVE, "width": 2, "shape": "hv"},
                            hovertemplate=f"%{{y:,}} {unit} available at the end<extra></extra>")
        else:
            y2 = f"Cumulative net used ({unit})"
            fig.add_scatter(x=x, y=right, name=y2, yaxis="y2", mode="lines",
                            line={"color": CUMULATIVE, "width": 2, "shape": "hv"},
                            hovertemplate=f"%{{y:,}} {unit} used so far<extra></extra>")
        charged = "Charged units" if product.metered else "Units"
        _layout(fig, title=f"{charged} consumed per {granularity}", ytitle=f"{charged} ({unit})",
                xtitle=xtitle, y2title=y2)
        _align_zeros(fig, top=max(consumed, default=0), bottom=max(refunds, default=0), top2=max(right, default=0))
    fig.update_xaxes(hoverformat=when)
    if granularity == "month":
        fig.update_xaxes(dtick="M1", tickformat="%b %Y")
    return fig


def _align_zeros(fig: Figure, *, top: int, bottom: int, top2: int) -> None:
    """Refunds go below zero on the left axis; put the right axis' zero on the same line."""
    if top <= 0 or top2 <= 0:
        return
    pad = 1.08
    fig.update_layout(
        yaxis={"range": [-bottom * pad, top * pad], "autorange": False},
        yaxis2={"range": [-bottom / top * top2 * pad, top2 * pad], "autorange": False, "tickmode": "auto"},
    )
    if bottom == 0:
        fig.update_layout(yaxis={"range": [0, top * pad]}, yaxis2={"range": [0, top2 * pad]})


def breakdown_figure(product: Product, table: Table, by: str) -> Figure:
    """Horizontal bars, largest first, one per service or user."""
    # Plotly reads <b>, <a href> ... in labels as markup: service and user names are data, so escape them.
    keys = [html.escape(k, quote=False) for k in table.column(by)[::-1]]
    unit = product.unit
    fig = Figure()
    if product.is_returnable:
        fig.add_bar(y=keys, x=table.column("checked_out")[::-1], orientation="h", name=f"Checked out ({unit})",
                    marker_color=CONSUMED, hovertemplate=f"%{{y}}: %{{x:,}} {unit} checked out<extra></extra>")
        fig.add_bar(y=keys, x=table.column("returned")[::-1], orientation="h", name=f"Returned ({unit})",
                    marker_color=RETURNED, hovertemplate=f"%{{y}}: %{{x:,}} {unit} returned<extra></extra>")
        fig.update_layout(barmode="group")
        xtitle = unit.capitalize()
    else:
        fig.add_bar(y=keys, x=table.column("net_consumed")[::-1], orientation="h", name=f"Net used ({unit})",
                    marker_color=CONSUMED, customdata=table.column("refunded")[::-1],
                    hovertemplate=f"%{{y}}: %{{x:,}} {unit} net (%{{customdata:,}} refunded)<extra></extra>")
        xtitle = f"Net used ({unit})"
    title = "By service" if by == "service" else "By user"
    _layout(fig, title=title, ytitle="", date_axis=False)
    fig.update_layout(
        height=max(220, 80 + 34 * len(keys)),
        xaxis={"title": {"text": xtitle}, "rangemode": "tozero", "tickformat": ",d"},
        yaxis={"title": {"text": ""}, "automargin": True, "tickformat": ""},
        margin={"l": 24, "r": 24, "t": 16, "b": 56},
        barmode="group" if product.is_returnable else "relative",
    )
    return fig


def caption(fig: Figure) -> str:
    return (fig.layout.get("meta") or {}).get("caption", "")


def figure_json(fig: Figure) -> str:
    """JSON for a <script type="application/json"> (json_script-safe: no raw '<')."""
    return fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
