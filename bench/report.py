"""The one summary table of `bench/run`, the machine line, and the end-to-end suite's results file.

The end-to-end suite (tests/e2e/) writes bench/results/e2e.json; its format is documented in
bench/README.md and checked by `load_e2e` (a missing file reads as "not run").
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
E2E_RESULTS = RESULTS / "e2e.json"

LATENCY_BAR, LATENCY_GOAL = 1.25, 1.0
THROUGHPUT_BAR, THROUGHPUT_GOAL = 0.4, 0.8


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    try:
        ssh = subprocess.run(["ssh", "-V"], check=False, capture_output=True, text=True).stderr.strip().split(",")[0]
    except OSError:
        ssh = "?"
    try:
        import paramiko
        paramiko_version = paramiko.__version__
    except ImportError:
        paramiko_version = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": socket.gethostname(), "cpu": cpu, "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / 1048576:.0f} GiB", "kernel": platform.release(),
        "python": platform.python_version(), "openssh": ssh, "paramiko": paramiko_version,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def load_e2e(path: Path) -> dict[str, Any] | None:
    """The e2e suite's results, or None when the file is absent. Raises ValueError if malformed."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("alerts"), list):
        raise ValueError(f"{path}: expected an object with an `alerts` list (see bench/README.md)")
    for i, row in enumerate(data["alerts"]):
        for key in ("fault", "alert", "fired_seconds"):
            if key not in row:
                raise ValueError(f"{path}: alerts[{i}] has no {key!r} (see bench/README.md)")
    return data


def _secs(value: Any, cap: Any = None) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    return f"> {cap:g} s" if cap else "n/a"


def _verdict(ratio: float, bar: float, goal: float, higher_is_better: bool) -> str:
    if higher_is_better:
        return "goal met" if ratio >= goal else ("bar met" if ratio >= bar else "MISSES the bar")
    return "goal met" if ratio <= goal else ("bar met" if ratio <= bar else "MISSES the bar")


def rows(results: dict[str, Any], e2e: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(measure, agent, reference, ratio/verdict) rows of the summary table."""
    out: list[tuple[str, str, str, str]] = []
    lat = results.get("latency")
    if lat:
        size = f"{lat['page_bytes'] / 1000:.0f} KB"
        for mode, table in lat["modes"].items():
            agent, ssh, st = table.get("agent", {}), table.get("ssh -L", {}), table.get("sshtunnel", {})
            if "p50" in agent and "p50" in ssh:
                ratio = agent["ratio_p50"]
                out.append((f"latency p50/p95, {size} /metrics, {mode}",
                            f"{agent['p50']:.2f} / {agent['p95']:.2f} ms",
                            f"ssh -L {ssh['p50']:.2f} / {ssh['p95']:.2f} ms",
                            f"{ratio:.2f}x / {agent['ratio_p95']:.2f}x ({_verdict(ratio, LATENCY_BAR, LATENCY_GOAL, False)};"
                            f" bar <= {LATENCY_BAR}x, goal <= {LATENCY_GOAL}x)"))
            if "cpu_ms_per_fetch" in agent and "cpu_ms_per_fetch" in ssh:
                out.append((f"  CPU per fetch of the tunnel process, {mode}", f"{agent['cpu_ms_per_fetch']:.2f} ms",
                            f"ssh -L {ssh['cpu_ms_per_fetch']:.2f} ms",
                            f"{agent['cpu_ms_per_fetch'] / ssh['cpu_ms_per_fetch']:.1f}x"
                            if ssh["cpu_ms_per_fetch"] >= 0.05 else "too few fetches to compare"))
            if "p50" in st and "p50" in ssh:
                direct = table.get("direct", {})
                out.append((f"  baselines, {mode}", f"direct {direct.get('p50', float('nan')):.2f} ms",
                            f"sshtunnel {st['p50']:.2f} ms", f"sshtunnel {st['ratio_p50']:.2f}x ssh -L"))
    thr = results.get("throughput")
    if thr:
        agent, ssh = thr["configs"].get("agent", {}), thr["configs"].get("ssh -L", {})
        if "mb_per_s" in agent and "mb_per_s" in ssh:
            ratio = agent["ratio"]
            out.append((f"throughput, {thr['bytes'] / 1048576:g} MiB through one forward",
                        f"{agent['mb_per_s']:.0f} MB/s", f"ssh -L {ssh['mb_per_s']:.0f} MB/s",
                        f"{ratio:.2f}x ({_verdict(ratio, THROUGHPUT_BAR, THROUGHPUT_GOAL, True)}; "
                        f"bar >= {THROUGHPUT_BAR}x, goal >= {THROUGHPUT_GOAL}x)"))
    faults = results.get("faults")
    if faults:
        cap = faults["cap_seconds"]
        for key, title in (("sshd_restart", "recovery after sshd restart (from sshd accepting)"),
                           ("session_kill9", "recovery after session kill -9 (from the kill)")):
            t = faults[key]["tunnels"]
            out.append((title, _secs(t.get("agent", {}).get("seconds"), cap),
                        f"autossh {_secs(t.get('autossh (seed)', {}).get('seconds'), cap)}",
                        "goal <= 1 s, bar <= 3 s"))
        bh = faults["blackhole"]
        det = bh["detected_seconds"]
        ref = (f"autossh 30x3 {_secs(det.get('autossh (seed)'), bh['cap_seconds'])}"
               if bh["autossh"] == "measured" else f"autossh {bh['autossh']}")
        out.append(("blackhole detection (tunnel_up 0 / ssh exits)",
                    f"{_secs(det.get('agent'), bh['cap_seconds'])} (5x3)", ref, "issue: <= 15 s by default"))
        rec = bh["recovered_after_clear"]
        out.append(("  blackhole lifted -> fetch works", _secs(rec.get("agent", {}).get("seconds"), cap),
                    f"autossh {_secs(rec.get('autossh (seed)', {}).get('seconds'), cap)}" if "autossh (seed)" in rec
                    else "", ""))
    fleet = results.get("fleet")
    if fleet:
        a, s = fleet["agent"], fleet["autossh"]
        label = f"fleet {fleet['hosts']} hosts x 5 forwards"
        rss_verdict = "goal met" if a["rss_mb"] <= 80 else ("bar met" if a["rss_mb"] <= 150 else "MISSES the bar")
        cpu_verdict = ("goal met" if a["cpu_percent"] <= 1 else
                       ("bar met" if a["cpu_percent"] <= 3 else "MISSES the bar"))
        out.append((f"{label}: memory", f"RSS {a['rss_mb']:.0f} MB (1 process)",
                    f"{s['processes']} autossh+ssh: RSS {s['rss_mb']:.0f} MB, PSS {s['pss_mb']:.0f} MB",
                    f"{rss_verdict}; bar <= 150 MB, goal <= 80 MB"))
        out.append((f"{label}: idle CPU ({fleet['idle_seconds']:.0f} s)", f"{a['cpu_percent']:.2f} % of a core",
                    f"{s['cpu_percent']:.2f} % of a core", f"{cpu_verdict}; bar <= 3 %, goal <= 1 %"))
    if e2e is None:
        out.append(("fault-to-alert times (tests/e2e, bench/results/e2e.json)", "not run", "", ""))
    else:
        scale = e2e.get("time_scale")
        for row in e2e["alerts"]:
            fired = row.get("fired_seconds")
            agent = _secs(fired) if fired is not None else "NOT FIRED"
            prod = row.get("production_seconds")
            extra = f"at production settings ~{_secs(prod)}" if prod is not None else ""
            if row.get("resolved_seconds") is not None:
                extra += ("; " if extra else "") + f"resolved {_secs(row['resolved_seconds'])}"
            ref = row.get("seed", "")
            out.append((f"alert {row['alert']} <- {row['fault']}" + (f" (time scale {scale:g})" if scale else ""),
                        agent, ref, extra))
    return out


def table(results: dict[str, Any], e2e: dict[str, Any] | None, info: dict[str, str]) -> str:
    """The summary as a Markdown table, with the date and machine above it."""
    head = (f"bench/run {info['date']} on {info['host']}: {info['cpu']}, {info['cores']} cores, {info['memory']}, "
            f"Linux {info['kernel']}, Python {info['python']}, {info['openssh']}, paramiko {info['paramiko']}, "
            f"load at start {info['load']}")
    lines = [head, "", "| measure | agent | reference | ratio / verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results, e2e)]
    return "\n".join(lines)
