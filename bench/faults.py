"""Fault recovery and dead-link detection: this agent against the seed's autossh, on the same faults.

Both tunnels forward to the same namespace host (a 4 KB /metrics on its 127.0.0.1:8000) and suffer
the same fault at the same instant:
  sshd restarted       every session killed and the listener stopped, then sshd started again;
                       time from "sshd accepts again" until a fetch through the forward is byte-exact
  session killed -9    sshd's per-connection processes SIGKILLed (the listener stays);
                       time from the kill until a fetch through the forward is byte-exact
  blackhole            iptables DROP of the SSH port inside the namespace (no RST, no FIN);
                       detection: the agent's own /metrics shows tunnel_up 0 / autossh's ssh child exits;
                       then the DROP is lifted and the time until a fetch works again is measured
autossh runs exactly as the seed wrote it (`-M 0 -o "ServerAliveInterval 30" -o "ServerAliveCountMax 3"
-N`), with its default AUTOSSH_POLL (600 s: the cap of its restart back-off) and AUTOSSH_GATETIME (30 s:
an ssh that dies within 30 s of the first start makes autossh give up), so the faults start only once
autossh is past its starting gate. Quick mode sets AUTOSSH_GATETIME=0 instead and skips autossh's
blackhole (90 s+).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

from lab import (
    Fetcher,
    Lab,
    RemoteHost,
    Tunnel,
    expected_page,
    process_tree,
    progress,
    wait_until,
)

METRICS_PORT = 8000
PAGE_SIZE = 4096
GATE_TIME = 30.0  # autossh's default AUTOSSH_GATETIME


def run(lab: Lab, quick: bool = False, cap: float = 60.0, blackhole_cap: float = 150.0) -> dict[str, Any]:
    page_len = len(expected_page(PAGE_SIZE))
    host = lab.host({METRICS_PORT: PAGE_SIZE})
    fetchers = [lab.fetcher(), lab.fetcher()]
    autossh_env = {"AUTOSSH_GATETIME": "0"} if quick else {}
    autossh = lab.autossh_forward(host, METRICS_PORT, env=autossh_env)
    started = time.monotonic()
    agent = lab.agent_forward(host, METRICS_PORT)
    tunnels = [agent, autossh]
    for tunnel in tunnels:
        lab.wait_forward(tunnel, fetchers[0])
    assert agent.agent is not None
    agent.agent.wait_up()
    result: dict[str, Any] = {
        "autossh": {"command": "autossh -M 0 -o 'ServerAliveInterval 30' -o 'ServerAliveCountMax 3' -N -L ...",
                    "AUTOSSH_GATETIME": autossh_env.get("AUTOSSH_GATETIME", "30 (default)"),
                    "AUTOSSH_POLL": "600 (default)"},
        "agent": {"ServerAliveInterval": 5, "ServerAliveCountMax": 3},
        "page_bytes": page_len, "cap_seconds": cap,
    }
    if not quick and time.monotonic() - started < GATE_TIME + 1:
        wait = GATE_TIME + 1 - (time.monotonic() - started)
        progress(f"faults: waiting {wait:.0f}s until autossh is past its {GATE_TIME:g}s starting gate")
        time.sleep(wait)  # autossh's own rule, not a readiness wait: nothing to poll for

    progress("faults: sshd restart")

    def restart() -> None:
        host.stop_sshd()
        host.start_sshd()
    result["sshd_restart"] = _recovery(tunnels, fetchers, page_len, restart, cap, measure_from="accepts")
    _settle(lab, tunnels, fetchers[0], host)

    progress("faults: sshd session killed -9")
    result["session_kill9"] = _recovery(tunnels, fetchers, page_len, lambda: host.kill_sessions(signal.SIGKILL),
                                        cap, measure_from="fault")
    _settle(lab, tunnels, fetchers[0], host)

    progress("faults: blackhole (iptables DROP)" + ("" if not quick else ", agent only"))
    result["blackhole"] = _blackhole(host, agent, None if quick else autossh, fetchers, page_len,
                                     blackhole_cap, cap)
    result["alive_after"] = {t.label: t.alive() for t in tunnels}
    return result


def _recovery(tunnels: list[Tunnel], fetchers: list[Fetcher], page_len: int, fault: Any, cap: float,
              measure_from: str) -> dict[str, Any]:
    """Cause `fault`, then poll every tunnel in parallel until a byte-exact fetch; seconds per tunnel."""
    t_fault = time.monotonic()
    fault()
    t_ref = time.monotonic() if measure_from == "accepts" else t_fault
    times: dict[str, Any] = {}
    threads = [threading.Thread(target=_poll_until_ok, args=(t, f, page_len, t_ref, cap, times))
               for t, f in zip(tunnels, fetchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"measured_from": "sshd accepting again" if measure_from == "accepts" else "the fault",
            "fault_seconds": (t_ref - t_fault) if measure_from == "accepts" else 0.0, "tunnels": times}


def _poll_until_ok(tunnel: Tunnel, fetcher: Fetcher, page_len: int, t_ref: float, cap: float,
                   out: dict[str, Any]) -> None:
    attempts = 0
    while time.monotonic() - t_ref < cap:
        attempts += 1
        answer = fetcher.get(tunnel.local_port, timeout=2)
        if answer.get("status") == 200 and answer.get("bytes") == page_len:
            out[tunnel.label] = {"seconds": time.monotonic() - t_ref, "recovered": True, "attempts": attempts,
                                 "bytes_ok": True}
            return
        time.sleep(0.05)  # the polling cadence of the measurement, not a wait for readiness
    out[tunnel.label] = {"seconds": None, "recovered": False, "attempts": attempts, "bytes_ok": False,
                         "alive": tunnel.alive()}


def _settle(lab: Lab, tunnels: list[Tunnel], fetcher: Fetcher, host: RemoteHost) -> None:
    """Between faults: every tunnel answers again (a tunnel that never recovered is left as it is)."""
    for tunnel in tunnels:
        if tunnel.alive():
            try:
                lab.wait_forward(tunnel, fetcher, timeout=30)
            except (TimeoutError, RuntimeError) as exc:
                progress(f"  {tunnel.label} did not come back: {exc}")
    if tunnels[0].agent is not None:
        tunnels[0].agent.wait_up(30)


def _blackhole(host: RemoteHost, agent: Tunnel, autossh: Tunnel | None, fetchers: list[Fetcher], page_len: int,
               cap: float, recover_cap: float) -> dict[str, Any]:
    assert agent.agent is not None
    agent_proc = agent.agent
    ssh_children = [p for p in process_tree(autossh.pid)[1:]] if autossh is not None else []
    detected: dict[str, Any] = {agent.label: None}
    if autossh is not None:
        detected[autossh.label] = None
    t_fault = time.monotonic()
    host.blackhole()
    try:
        def agent_down() -> bool:
            value = next((v for k, v in agent_proc.metrics().items() if k.startswith("tunnel_up{")), None)
            return value == 0.0

        def check() -> bool:
            now = time.monotonic() - t_fault
            if detected[agent.label] is None and agent_down():
                detected[agent.label] = now
                progress(f"  agent detected the blackhole after {now:.1f}s")
            if autossh is not None and detected[autossh.label] is None and ssh_children \
                    and not any(_exists(p) for p in ssh_children):
                detected[autossh.label] = now
                progress(f"  autossh's ssh exited after {now:.1f}s")
            return all(v is not None for v in detected.values())

        try:
            wait_until(check, cap, "blackhole detection", interval=0.1)
        except TimeoutError:
            pass
    finally:
        t_clear = time.monotonic()
        host.clear_blackhole()
    recovered: dict[str, Any] = {}
    tunnels = [agent] + ([autossh] if autossh is not None else [])
    threads = [threading.Thread(target=_poll_until_ok, args=(t, f, page_len, t_clear, recover_cap, recovered))
               for t, f in zip(tunnels, fetchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"cap_seconds": cap, "held_seconds": t_clear - t_fault,
            "detected_seconds": detected, "recovered_after_clear": recovered,
            "autossh": "measured" if autossh is not None else "skipped (quick mode)"}


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def render(result: dict[str, Any]) -> str:
    def secs(value: Any) -> str:
        return f"{value:.2f} s" if isinstance(value, (int, float)) else f"> {result['cap_seconds']:g} s"

    lines = ["Faults: agent (ServerAlive 5x3) vs the seed's autossh (ServerAlive 30x3, "
             f"AUTOSSH_GATETIME={result['autossh']['AUTOSSH_GATETIME']}, AUTOSSH_POLL=600)"]
    for key, title in (("sshd_restart", "sshd restarted (from sshd accepting)"),
                       ("session_kill9", "session killed -9 (from the kill)")):
        rows = result[key]["tunnels"]
        lines.append(f"    {title:<40} " + "   ".join(
            f"{label}: {secs(row['seconds'])}" for label, row in rows.items()))
    bh = result["blackhole"]
    detected = "   ".join(f"{label}: " + (f"{v:.1f} s" if v is not None else f"> {bh['cap_seconds']:g} s")
                          for label, v in bh["detected_seconds"].items())
    if bh["autossh"] != "measured":
        detected += f"   autossh: {bh['autossh']}"
    lines.append(f"    {'blackhole detected':<40} {detected}")
    lines.append(f"    {'blackhole cleared -> fetch works':<40} " + "   ".join(
        f"{label}: {secs(row['seconds'])}" for label, row in bh["recovered_after_clear"].items()))
    return "\n".join(lines)
