#!/usr/bin/env python3
"""Scale the durations of the production alert rules by one factor: the one transform tests may apply.

(scale_alertmanager applies the same factor to alertmanager.yml's group_wait/group_interval/repeat_interval.)

`for:` and every range window in `expr` (`[5m]`, subquery `[10m:1m]`) are multiplied by FACTOR; windows
never go below --min-range (a rate needs a few scrapes in its window). Nothing else changes: the
expressions, thresholds, labels and annotations are the production ones, read from monitoring/rules.

    monitoring/scale_rules.py --factor 0.05 --min-range 4s monitoring/rules/*.yml -o /tmp/rules
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "y": 31_536_000_000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION = r"(?:\d+(?:ms|s|m|h|d|w|y))+"
_WINDOW = re.compile(rf"\[\s*({_DURATION})\s*(?::\s*({_DURATION})?\s*)?\]")


def parse_duration(text: str) -> int:
    """A Prometheus duration ("1m30s") in milliseconds; ValueError if it is not one."""
    text = text.strip()
    if not re.fullmatch(_DURATION, text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * UNITS_MS[unit] for n, unit in _PART.findall(text))


def format_duration(ms: int) -> str:
    """Milliseconds as the shortest Prometheus duration ("90000" -> "1m30s"; 0 -> "0s")."""
    if ms <= 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s", "ms"):
        count, ms = divmod(ms, UNITS_MS[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def scale_expr(expr: str, factor: float, min_range_ms: int = 0) -> str:
    """Every range window (and subquery step) of a PromQL expression scaled by factor."""
    def window(match: re.Match[str]) -> str:
        rng = max(round(parse_duration(match.group(1)) * factor), min_range_ms, 1)
        if match.group(0).find(":") < 0:
            return f"[{format_duration(rng)}]"
        step = match.group(2)
        step_text = format_duration(max(round(parse_duration(step) * factor), 1)) if step else ""
        return f"[{format_duration(rng)}:{step_text}]"
    return _WINDOW.sub(window, expr)


def scale_rules(document: dict[str, Any], factor: float, min_range_ms: int = 0) -> dict[str, Any]:
    """A copy of a rule file's document with `for:` and the expressions' range windows scaled."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, not {factor}")
    groups = []
    for group in document.get("groups", []):
        group = dict(group)
        if "interval" in group:
            group["interval"] = format_duration(round(parse_duration(str(group["interval"])) * factor))
        rules = []
        for rule in group.get("rules", []):
            rule = dict(rule)
            rule["expr"] = scale_expr(str(rule["expr"]), factor, min_range_ms)
            if "for" in rule:
                rule["for"] = format_duration(round(parse_duration(str(rule["for"])) * factor))
            rules.append(rule)
        group["rules"] = rules
        groups.append(group)
    return {**document, "groups": groups}


def scale_alertmanager(document: dict[str, Any], factor: float, floor_ms: int = 100) -> dict[str, Any]:
    """A copy of alertmanager.yml with every route's group_wait, group_interval and repeat_interval scaled.

    The same factor as the rules: without it a test would wait the production 30 s group_wait and 5 min
    group_interval between a rule firing and its notification. Routes, receivers and inhibitions stay.
    """
    if factor <= 0:
        raise ValueError(f"factor must be > 0, not {factor}")

    def scale(route: dict[str, Any]) -> dict[str, Any]:
        route = dict(route)
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route:
                route[key] = format_duration(max(round(parse_duration(str(route[key])) * factor), floor_ms))
        if "routes" in route:
            route["routes"] = [scale(child) for child in route["routes"]]
        return route

    return {**document, "route": scale(document["route"])}


class _BlockDumper(yaml.SafeDumper):
    """Dumps multi-line strings (expressions) as literal blocks, as they are written in the rules."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def scale_files(paths: Sequence[Path], out_dir: Path, factor: float, min_range_ms: int = 0) -> list[Path]:
    """Write each rule file, scaled, under out_dir with the same name; return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        document = yaml.safe_load(path.read_text())
        target = out_dir / path.name
        header = f"# GENERATED by monitoring/scale_rules.py --factor {factor:g} from {path.name}: do not edit\n"
        target.write_text(header + yaml.dump(scale_rules(document, factor, min_range_ms), Dumper=_BlockDumper,
                                                  sort_keys=False, width=120))
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rule_files", nargs="+", type=Path)
    parser.add_argument("--factor", type=float, required=True, help="multiply every duration by this (e.g. 0.05)")
    parser.add_argument("--min-range", default="0s", help="smallest range window after scaling (e.g. 4s)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="directory for the scaled files")
    args = parser.parse_args(argv)
    try:
        min_range = parse_duration(args.min_range)
        for path in scale_files(args.rule_files, args.out, args.factor, min_range):
            print(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"scale_rules: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
