"""Result keys, goals and the printed table. Pure functions: no Django, no database."""

from __future__ import annotations

from dataclasses import dataclass

# Every key of bench/results.json's "results", in the order they are printed.
RESULT_KEYS = (
    "floor_json_rps",
    "consume_rps",
    "batch_events_per_s",
    "copy_rows_per_s",
    "floor_page_p50_ms",
    "dashboard_p50_ms",
    "dashboard_partial_p50_ms",
    "dashboard_queries",
    "dashboard_partial_queries",
    "dashboard_queries_5",
    "dashboard_partial_queries_5",
    "history_p50_ms",
)

UNITS = {
    "floor_json_rps": "req/s",
    "consume_rps": "req/s",
    "batch_events_per_s": "events/s",
    "copy_rows_per_s": "rows/s",
    "floor_page_p50_ms": "ms",
    "dashboard_p50_ms": "ms",
    "dashboard_partial_p50_ms": "ms",
    "dashboard_queries": "queries",
    "dashboard_partial_queries": "queries",
    "dashboard_queries_5": "queries",
    "dashboard_partial_queries_5": "queries",
    "history_p50_ms": "ms",
}

# The measurement names accepted by --only, and the result keys each produces.
MEASUREMENTS = {
    "floor_json": ("floor_json_rps",),
    "consume": ("consume_rps",),
    "batch": ("batch_events_per_s",),
    "copy": ("copy_rows_per_s",),
    "floor_page": ("floor_page_p50_ms",),
    "dashboard": (
        "dashboard_p50_ms", "dashboard_partial_p50_ms", "dashboard_queries", "dashboard_partial_queries",
        "dashboard_queries_5", "dashboard_partial_queries_5",
    ),
    "history": ("history_p50_ms",),
}

MAX_DASHBOARD_QUERIES = 10


@dataclass(frozen=True)
class Goal:
    name: str
    text: str
    measured: str
    ratio: float | None  # measured / floor (None when a side is missing)
    target: str
    passed: bool | None  # None: not measured in this run

    def as_dict(self) -> dict:
        return {
            "name": self.name, "goal": self.text, "measured": self.measured,
            "ratio": None if self.ratio is None else round(self.ratio, 3), "target": self.target,
            "pass": self.passed,
        }


def _have(results: dict, *keys: str) -> bool:
    return all(isinstance(results.get(k), int | float) and not isinstance(results.get(k), bool) for k in keys)


def compute_goals(results: dict) -> list[Goal]:
    """The issue's goals, each with its ratio and pass/fail (None when not measured)."""
    goals = []

    if _have(results, "consume_rps", "floor_json_rps") and results["floor_json_rps"] > 0:
        r = results["consume_rps"] / results["floor_json_rps"]
        goals.append(Goal("consume", "consume_rps >= 0.30 x floor_json_rps",
                          f"{results['consume_rps']:.0f} / {results['floor_json_rps']:.0f} req/s", r, ">= 0.30",
                          r >= 0.30))
    else:
        goals.append(Goal("consume", "consume_rps >= 0.30 x floor_json_rps", "n/a", None, ">= 0.30", None))

    if _have(results, "batch_events_per_s", "copy_rows_per_s") and results["copy_rows_per_s"] > 0:
        r = results["batch_events_per_s"] / results["copy_rows_per_s"]
        goals.append(Goal("batch", "batch_events_per_s >= 0.10 x copy_rows_per_s",
                          f"{results['batch_events_per_s']:.0f} / {results['copy_rows_per_s']:.0f} per s", r,
                          ">= 0.10", r >= 0.10))
    else:
        goals.append(Goal("batch", "batch_events_per_s >= 0.10 x copy_rows_per_s", "n/a", None, ">= 0.10", None))

    dash_keys = ("dashboard_p50_ms", "dashboard_partial_p50_ms", "floor_page_p50_ms")
    if _have(results, *dash_keys) and results["floor_page_p50_ms"] > 0:
        worst = max(results["dashboard_p50_ms"], results["dashboard_partial_p50_ms"])
        r = worst / results["floor_page_p50_ms"]
        goals.append(Goal("dashboard_time", "dashboard_p50_ms (page and partial) <= 4 x floor_page_p50_ms",
                          f"{results['dashboard_p50_ms']:.1f} / {results['dashboard_partial_p50_ms']:.1f}"
                          f" vs {results['floor_page_p50_ms']:.1f} ms", r, "<= 4.0", r <= 4.0))
    else:
        goals.append(Goal("dashboard_time", "dashboard_p50_ms (page and partial) <= 4 x floor_page_p50_ms",
                          "n/a", None, "<= 4.0", None))

    q_keys = ("dashboard_queries", "dashboard_partial_queries", "dashboard_queries_5", "dashboard_partial_queries_5")
    if _have(results, *q_keys):
        q50 = (results["dashboard_queries"], results["dashboard_partial_queries"])
        q5 = (results["dashboard_queries_5"], results["dashboard_partial_queries_5"])
        ok = max(q50) <= MAX_DASHBOARD_QUERIES and q50 == q5
        goals.append(Goal("dashboard_queries",
                          f"dashboard_queries <= {MAX_DASHBOARD_QUERIES}, same for 5 and 50 products",
                          f"page {q50[0]} (5: {q5[0]}), partial {q50[1]} (5: {q5[1]})", None,
                          f"<= {MAX_DASHBOARD_QUERIES}, equal", ok))
    else:
        goals.append(Goal("dashboard_queries",
                          f"dashboard_queries <= {MAX_DASHBOARD_QUERIES}, same for 5 and 50 products",
                          "n/a", None, f"<= {MAX_DASHBOARD_QUERIES}, equal", None))

    if _have(results, "history_p50_ms", "floor_page_p50_ms") and results["floor_page_p50_ms"] > 0:
        r = results["history_p50_ms"] / results["floor_page_p50_ms"]
        goals.append(Goal("history", "history_p50_ms <= 3 x floor_page_p50_ms",
                          f"{results['history_p50_ms']:.1f} vs {results['floor_page_p50_ms']:.1f} ms", r, "<= 3.0",
                          r <= 3.0))
    else:
        goals.append(Goal("history", "history_p50_ms <= 3 x floor_page_p50_ms", "n/a", None, "<= 3.0", None))
    return goals


def parse_only(value: str | None) -> list[str]:
    """``--only dashboard,history`` -> the measurement names, validated, in run order."""
    if not value:
        return list(MEASUREMENTS)
    wanted = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [w for w in wanted if w not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    if "copy" in wanted and "batch" not in wanted:
        pass  # copy then uses the default row count
    return [m for m in MEASUREMENTS if m in wanted]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"
    return f"{value:,}"


def render_table(results: dict, skipped: dict[str, str], goals: list[Goal]) -> str:
    """The printed report: every result key (or why it was skipped), then the goals."""
    lines = []
    width = max(len(k) for k in RESULT_KEYS)
    lines.append(f"{'measurement'.ljust(width)}  {'value':>14}  unit")
    lines.append(f"{'-' * width}  {'-' * 14}  {'-' * 8}")
    for key in RESULT_KEYS:
        if key in results:
            lines.append(f"{key.ljust(width)}  {_fmt(results[key]):>14}  {UNITS[key]}")
        else:
            lines.append(f"{key.ljust(width)}  {'skipped':>14}  {skipped.get(key, 'not measured')}")
    lines.append("")
    gw = max(len(g.text) for g in goals)
    lines.append(f"{'goal'.ljust(gw)}  {'ratio':>6}  {'target':>16}  result  measured")
    lines.append(f"{'-' * gw}  {'-' * 6}  {'-' * 16}  ------  --------")
    for g in goals:
        verdict = "n/a" if g.passed is None else ("PASS" if g.passed else "MISS")
        ratio = "-" if g.ratio is None else f"{g.ratio:.2f}"
        lines.append(f"{g.text.ljust(gw)}  {ratio:>6}  {g.target:>16}  {verdict:<6}  {g.measured}")
    return "\n".join(lines)
