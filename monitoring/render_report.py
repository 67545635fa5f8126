#!/usr/bin/env python3
"""Render the Grafana dashboard's data as a PNG (and HTML) report, without Grafana.

Every panel's query of monitoring/grafana/dashboards/*.json runs against a Prometheus, with the
dashboard's variables and Grafana's macros ($__rate_interval, $__interval, $__range) replaced the way
Grafana would, and is drawn with matplotlib: time series as lines (threshold lines included), stat
panels as their last value, state timelines as up/down bars.

    monitoring/render_report.py --prometheus http://127.0.0.1:9090 --minutes 30 --out report.png --html report.html
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "dashboards" / "pipeline-overview.json"


@dataclass
class PanelQuery:
    """One target of one panel, with the variables substituted."""

    panel: str
    row: str
    type: str
    ref: str
    expr: str
    legend: str
    unit: str
    thresholds: list[float] = field(default_factory=list)
    threshold_lines: bool = False
    colours: list[tuple[str, float | None]] = field(default_factory=list)
    decimals: int | None = None
    sparkline: bool = False

    def colour(self, value: float) -> str:
        """The colour of `value` by the panel's threshold steps (Grafana's rule: the last step <= value)."""
        chosen = "green"
        for colour, limit in self.colours:
            if limit is None or value >= limit:
                chosen = colour
        return {"green": "tab:green", "red": "tab:red", "orange": "tab:orange"}.get(chosen, chosen)


@dataclass
class Series:
    name: str
    times: list[float]
    values: list[float]


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def seconds(duration: str) -> float:
    """'1m30s' -> 90.0 (Prometheus duration)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def duration(secs: float) -> str:
    """90.0 -> '90s' (whole seconds, at least 1s)."""
    return f"{max(1, math.ceil(secs))}s"


def macros(range_seconds: float, scrape_interval: float, step: float) -> dict[str, str]:
    """Grafana's macros for a query over `range_seconds` with points every `step` seconds.

    $__rate_interval is max($__interval + scrape interval, 4 x scrape interval), as Grafana computes it.
    """
    return {"__rate_interval": duration(max(step + scrape_interval, 4 * scrape_interval)),
            "__interval": duration(step), "__range": duration(range_seconds),
            "__range_s": str(int(range_seconds)), "__interval_ms": str(int(step * 1000))}


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name, ${name} and [[name]] by their values; an unknown variable is an error."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in variables:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return variables[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def panel_queries(dashboard: dict[str, Any], variables: dict[str, str]) -> list[PanelQuery]:
    """Every target of every panel (rows included), with variables and macros substituted."""
    out: list[PanelQuery] = []
    row = ""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    for panel in panels:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        steps = defaults.get("thresholds", {}).get("steps", [])
        mode = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
        for target in panel.get("targets", []):
            out.append(PanelQuery(panel=panel["title"], row=row, type=panel["type"], ref=target["refId"],
                                  expr=substitute(target["expr"], variables), legend=target.get("legendFormat", ""),
                                  unit=defaults.get("unit", ""),
                                  thresholds=[s["value"] for s in steps if s.get("value") is not None],
                                  threshold_lines=mode != "off",
                                  colours=[(s["color"], s.get("value")) for s in steps],
                                  decimals=defaults.get("decimals"),
                                  sparkline=panel["type"] == "stat" and "$__range" not in target["expr"]
                                  and "${__range" not in target["expr"]))
    return out


class Prometheus:
    """The two HTTP API calls the report needs; errors carry Prometheus' own message."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise ValueError(f"{body.get('errorType', exc.code)}: {body.get('error', exc.reason)}") from None
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:g}"})["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match})


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def fetch(prom: Prometheus, query: PanelQuery, start: float, end: float, step: float) -> list[Series]:
    """The data of one query: a range for time series and timelines, one instant value for stats."""
    if query.type == "stat" and not query.sparkline:
        result = prom.query(query.expr, end)
        return [Series(legend(query.legend, r["metric"]), [float(r["value"][0])], [float(r["value"][1])])
                for r in result]
    result = prom.query_range(query.expr, start, end, step)
    return [Series(legend(query.legend, r["metric"]), [float(t) for t, _ in r["values"]],
                   [float(v) for _, v in r["values"]]) for r in result]


def fmt_value(value: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "NaN"
    if decimals is not None and unit in ("short", "none", ""):
        return f"{value:.{decimals}f}"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.1f} {suffix}"
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "Bps":
        return fmt_value(value, "bytes") + "/s"
    if unit == "reqps":
        return f"{value:.2f} req/s"
    if unit == "percentunit":
        return f"{value:.1%}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def render(panels: list[tuple[PanelQuery, list[Series]]], out: Path, title: str, start: float, end: float) -> None:
    """Draw one subplot per panel (targets of a panel share it) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime, timezone

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    grouped: dict[str, list[tuple[PanelQuery, list[Series]]]] = {}
    for query, series in panels:
        grouped.setdefault(query.panel, []).append((query, series))
    cols = 3
    rows = math.ceil(len(grouped) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    when = lambda ts: datetime.fromtimestamp(ts, tz=timezone.utc)
    for ax, (name, items) in zip(axes.flat, grouped.items()):
        first = items[0][0]
        ax.set_title(f"{first.row} / {name}" if first.row else name, fontsize=10, loc="left")
        if first.type == "stat":
            ax.axis("off")
            lines = [(s.name, s.values[-1]) for _, series in items for s in series]
            for i, (label, value) in enumerate(lines):
                colour = first.colour(value)
                ax.text(0.5, 0.62 - i * 0.3, fmt_value(value, first.unit, first.decimals), ha="center",
                        va="center", fontsize=26, color=colour, transform=ax.transAxes, zorder=3)
                ax.text(0.5, 0.40 - i * 0.3, label, ha="center", va="center", fontsize=9, transform=ax.transAxes)
            if first.sparkline:  # the stat's history under its value, as Grafana's graph mode "area"
                spark = ax.inset_axes([0.0, 0.0, 1.0, 0.32])
                for _, series in items:
                    for s in series:
                        spark.fill_between([when(t) for t in s.times], s.values, alpha=0.3,
                                           color=first.colour(s.values[-1]))
                        spark.plot([when(t) for t in s.times], s.values, linewidth=1, color=first.colour(s.values[-1]))
                spark.set_xlim(when(start), when(end))
                spark.set_ylim(bottom=0)
                spark.tick_params(labelsize=7)
                spark.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=timezone.utc))
                spark.yaxis.set_major_locator(plt.MaxNLocator(3, integer=True))
            continue
        if first.type == "state-timeline":
            labels = [s.name for _, series in items for s in series]
            for i, s in enumerate(s for _, series in items for s in series):
                for t, v in zip(s.times, s.values):
                    ax.barh(i, width=(end - start) / max(len(s.times), 1) / 86400, left=mdates.date2num(when(t)),
                            color="tab:green" if v >= 1 else "tab:red", height=0.8)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
        else:
            for query, series in items:
                for s in series:
                    ax.plot([when(t) for t in s.times], s.values, label=s.name, linewidth=1.2)
            if first.threshold_lines:
                for limit in first.thresholds:
                    ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8)
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _, unit=first.unit: fmt_value(v, unit)))
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7, loc="upper left")
            peak = max((v for _, series in items for s in series for v in s.values if not math.isnan(v)), default=0.0)
            ax.set_ylim(bottom=0, top=None if peak > 0 else 1)  # an all-zero line stays visible
        ax.set_xlim(when(start), when(end))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=7))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if end - start < 900 else "%H:%M",
                                                          tz=timezone.utc))
    for ax in list(axes.flat)[len(grouped):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_html(panels: list[tuple[PanelQuery, list[Series]]], png: Path, out: Path, title: str) -> None:
    """The PNG inline plus a table of every query, its series and last value."""
    rows = []
    for query, series in panels:
        values = "<br>".join(f"{html.escape(s.name)}: {fmt_value(s.values[-1], query.unit)}" for s in series)
        rows.append(f"<tr><td>{html.escape(query.panel)}</td><td><code>{html.escape(query.expr)}</code></td>"
                    f"<td>{len(series)}</td><td>{values or '<b>no data</b>'}</td></tr>")
    image = base64.b64encode(png.read_bytes()).decode()
    out.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                   f"<h1>{html.escape(title)}</h1><img src='data:image/png;base64,{image}' style='max-width:100%'>"
                   "<table border=1 cellpadding=4><tr><th>panel</th><th>query</th><th>series</th><th>last</th></tr>"
                   + "".join(rows) + "</table>\n")


def collect(prom: Prometheus, dashboard: dict[str, Any], host: str, minutes: float, scrape_interval: float,
            end: float | None = None) -> tuple[list[tuple[PanelQuery, list[Series]]], float, float]:
    """Run every panel's query; returns (query, series) pairs and the time window."""
    end = end or time.time()
    start = end - minutes * 60
    step = max(scrape_interval, (end - start) / 240)
    variables = {"host": host, **macros(end - start, scrape_interval, step)}
    return [(q, fetch(prom, q, start, end, step)) for q in panel_queries(dashboard, variables)], start, end


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--host", default=".+", help="value of $host (a regex, as Grafana's All)")
    parser.add_argument("--minutes", type=float, default=60, help="time range (default %(default)s)")
    parser.add_argument("--scrape-interval", default="15s", help="for $__rate_interval (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("dashboard-report.png"))
    parser.add_argument("--html", type=Path, help="also write an HTML page with the PNG and every query's values")
    parser.add_argument("--end", type=float, help="end of the range, Unix time (default: now)")
    parser.add_argument("--title", help="title of the report (default: dashboard, host, time)")
    args = parser.parse_args(argv)
    try:
        dashboard = load_dashboard(args.dashboard)
        panels, start, end = collect(Prometheus(args.prometheus), dashboard, args.host, args.minutes,
                                     seconds(args.scrape_interval), end=args.end)
        title = args.title or (f"{dashboard['title']} - host=~{args.host} - "
                               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}")
        render(panels, args.out, title, start, end)
        if args.html:
            write_html(panels, args.out, args.html, title)
    except (OSError, ValueError, KeyError) as exc:
        print(f"render_report: error: {exc}", file=sys.stderr)
        return 2
    empty = [q.panel for q, series in panels if not series]
    print(f"{args.out}: {len(panels)} queries, {len(panels) - len(empty)} with data"
          + (f"; empty: {', '.join(empty)}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
