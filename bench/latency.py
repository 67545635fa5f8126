"""Latency of one /metrics scrape (366 KB by default) through each kind of tunnel, as a ratio to `ssh -L`.

Configurations, all run in one process tree and interleaved round-robin (each round in a rotated
order) so they share the machine's noise:
  direct      the fetcher inside the namespace, on the host's own 127.0.0.1 (no tunnel at all)
  ssh -L      OpenSSH `ssh -N -L`, its defaults
  agent       this agent, `python tunnel.py -L ...` (its real CLI)
  sshtunnel   sshtunnel's SSHTunnelForwarder with its defaults
Two modes: "new connection" (a fresh TCP connection per fetch, Connection: close) and "keep-alive"
(one connection reused, as Prometheus does between scrapes of a target). Every fetch is checked
byte-exact (length and sha256 of the page).
"""
from __future__ import annotations

import hashlib
from typing import Any

from lab import Fetcher, Lab, expected_page, percentile, proc_cpu_seconds, progress, summary

METRICS_PORT = 8000
PAGE_SIZE = 366_000  # the seed's API /metrics page size (issue 3)
BASELINE = "ssh -L"
MODES = (("new connection", False), ("keep-alive", True))


def run(lab: Lab, requests: int = 100, size: int = PAGE_SIZE, warmup: int = 3) -> dict[str, Any]:
    """Fetch the page `requests` times per configuration and mode; return timings and byte checks."""
    page = expected_page(size)
    digest = hashlib.sha256(page).hexdigest()
    host = lab.host({METRICS_PORT: size})
    outside, inside = lab.fetcher(), lab.fetcher(host)
    tunnels = [lab.ssh_forward(host, METRICS_PORT), lab.agent_forward(host, METRICS_PORT),
               lab.sshtunnel_forward(host, METRICS_PORT)]
    for tunnel in tunnels:
        lab.wait_forward(tunnel, outside)
    if tunnels[1].agent is not None:
        tunnels[1].agent.wait_up()
    configs: list[tuple[str, Fetcher, int]] = [("direct", inside, METRICS_PORT)]
    configs += [(t.label, outside, t.local_port) for t in tunnels]

    result: dict[str, Any] = {"page_bytes": len(page), "requests": requests, "baseline": BASELINE, "modes": {}}
    for mode, keepalive in MODES:
        progress(f"latency ({mode}): {requests} fetches x {len(configs)} configurations")
        samples: dict[str, list[float]] = {label: [] for label, _, _ in configs}
        exact = {label: 0 for label, _, _ in configs}
        errors: dict[str, list[str]] = {label: [] for label, _, _ in configs}
        for label, fetcher, port in configs:  # warm-up: first connections, caches, keep-alive sockets
            for _ in range(warmup):
                fetcher.get(port, keepalive=keepalive)
        cpu_before = {t.label: proc_cpu_seconds(t.pid) for t in tunnels}
        for i in range(requests):
            shift = i % len(configs)
            for label, fetcher, port in configs[shift:] + configs[:shift]:
                answer = fetcher.get(port, keepalive=keepalive)
                if "error" in answer:
                    errors[label].append(answer["error"])
                    continue
                samples[label].append(answer["seconds"])
                if answer["status"] == 200 and answer["bytes"] == len(page) and answer["sha256"] == digest:
                    exact[label] += 1
            if requests >= 20 and (i + 1) % (requests // 4) == 0:
                progress(f"  {mode}: {i + 1}/{requests} rounds")
        cpu_ms = {t.label: 1000 * (proc_cpu_seconds(t.pid) - cpu_before[t.label]) / requests for t in tunnels}
        rows: dict[str, Any] = {}
        base = samples[BASELINE]
        for label, _, _ in configs:
            values = samples[label]
            row: dict[str, Any] = {"fetches": len(values), "bytes_ok": exact[label], "errors": errors[label][:3],
                                   "error_count": len(errors[label])}
            if values:
                row.update({k: v * 1000 for k, v in summary(values).items()})  # milliseconds
                if base:
                    row["ratio_p50"] = percentile(values, 50) / percentile(base, 50)
                    row["ratio_p95"] = percentile(values, 95) / percentile(base, 95)
            if label in cpu_ms:  # CPU time of the tunnel's own process per fetch (not the sshd side)
                row["cpu_ms_per_fetch"] = cpu_ms[label]
            rows[label] = row
        result["modes"][mode] = rows
    for tunnel in tunnels:
        result.setdefault("alive_after", {})[tunnel.label] = tunnel.alive()
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"Latency: {result['page_bytes']} B /metrics, {result['requests']} fetches per configuration, "
             f"interleaved; ratios to {result['baseline']}"]
    for mode, rows in result["modes"].items():
        lines.append(f"  {mode}:")
        lines.append(f"    {'configuration':<12} {'p50 ms':>8} {'p95 ms':>8} {'x p50':>7} {'x p95':>7} {'exact':>9}"
                     f" {'CPU ms/fetch':>13}")
        for label, row in rows.items():
            if "p50" not in row:
                lines.append(f"    {label:<12} {'failed':>8} ({row['error_count']} errors: {row['errors'][:1]})")
                continue
            lines.append(f"    {label:<12} {row['p50']:8.2f} {row['p95']:8.2f} {row.get('ratio_p50', 0):6.2f}x "
                         f"{row.get('ratio_p95', 0):6.2f}x {row['bytes_ok']:>4}/{row['fetches'] + row['error_count']}"
                         + (f" {row['cpu_ms_per_fetch']:13.2f}" if "cpu_ms_per_fetch" in row else ""))
    return "\n".join(lines)
