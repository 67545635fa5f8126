"""Bulk throughput through one forward: this agent against OpenSSH `ssh -L` (and the direct path).

A server on the host's 127.0.0.1 sends N bytes of a fixed pattern (bench/helpers/bulk_server.py); the
fetcher reads them through each configuration, rounds interleaved, and checks the sha256 of what
arrived. Reported: MB/s (median of the rounds) and the ratio to `ssh -L`.
"""
from __future__ import annotations

import statistics
import sys
from typing import Any

from lab import HELPERS, Lab, progress

BULK_PORT = 7000
BASELINE = "ssh -L"

sys.path.insert(0, str(HELPERS))
from bulk_server import pattern_digest


def run(lab: Lab, megabytes: float = 64, rounds: int = 3) -> dict[str, Any]:
    nbytes = int(megabytes * 1024 * 1024)
    digest = pattern_digest(nbytes)
    host = lab.host()
    lab.serve_bulk(host, BULK_PORT)
    outside, inside = lab.fetcher(), lab.fetcher(host)
    tunnels = [lab.ssh_forward(host, BULK_PORT), lab.agent_forward(host, BULK_PORT)]
    for tunnel in tunnels:
        lab.wait_forward(tunnel, outside, bulk=True)
    configs = [("direct", inside, BULK_PORT)] + [(t.label, outside, t.local_port) for t in tunnels]
    speeds: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    exact = {label: 0 for label, _, _ in configs}
    errors: dict[str, list[str]] = {label: [] for label, _, _ in configs}
    for i in range(rounds):
        progress(f"throughput: round {i + 1}/{rounds}, {megabytes:g} MB x {len(configs)} configurations")
        shift = i % len(configs)
        for label, fetcher, port in configs[shift:] + configs[:shift]:
            answer = fetcher.bulk(port, nbytes)
            if "error" in answer:
                errors[label].append(answer["error"])
                continue
            speeds[label].append(answer["bytes"] / answer["seconds"] / 1e6)
            if answer["bytes"] == nbytes and answer["sha256"] == digest:
                exact[label] += 1
    base = statistics.median(speeds[BASELINE]) if speeds[BASELINE] else None
    rows: dict[str, Any] = {}
    for label, _, _ in configs:
        row: dict[str, Any] = {"transfers": len(speeds[label]), "bytes_ok": exact[label],
                               "errors": errors[label][:3], "error_count": len(errors[label])}
        if speeds[label]:
            row["mb_per_s"] = statistics.median(speeds[label])
            row["min_mb_per_s"], row["max_mb_per_s"] = min(speeds[label]), max(speeds[label])
            if base:
                row["ratio"] = row["mb_per_s"] / base
        rows[label] = row
    return {"bytes": nbytes, "rounds": rounds, "baseline": BASELINE, "configs": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"Throughput: {result['bytes'] / 1048576:g} MiB per transfer, {result['rounds']} rounds interleaved; "
             f"ratio to {result['baseline']}",
             f"    {'configuration':<12} {'MB/s':>8} {'min':>8} {'max':>8} {'ratio':>7} {'exact':>7}"]
    for label, row in result["configs"].items():
        if "mb_per_s" not in row:
            lines.append(f"    {label:<12} {'failed':>8} ({row['error_count']} errors: {row['errors'][:1]})")
            continue
        lines.append(f"    {label:<12} {row['mb_per_s']:8.1f} {row['min_mb_per_s']:8.1f} {row['max_mb_per_s']:8.1f} "
                     f"{row.get('ratio', 0):6.2f}x {row['bytes_ok']:>3}/{row['transfers'] + row['error_count']}")
    return "\n".join(lines)
