"""Fleet: H hosts x 5 forwards in ONE agent, next to the seed's way (one autossh + ssh per host).

The hosts are ssh_config aliases (HostName, User, IdentityFile, UserKnownHostsFile) spread over a few
namespace sshds, each serving the five default exporters (4 KB /metrics) on its 127.0.0.1. The agent
gets a YAML --config listing every alias with the five default forwards and local ports auto-assigned
from `local_port_range`; its probes, keepalives (5 s) and metrics run as in production. The seed's
side is one `autossh -M 0 -o "ServerAliveInterval 30" -o "ServerAliveCountMax 3" -N -L x5` per host.
Both sides are measured over the same idle window (no traffic from the bench): CPU time used (% of one
core), RSS (and PSS, which splits shared pages fairly between the 100 ssh/autossh processes), threads.
"""
from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Any

from lab import (
    Lab,
    RemoteHost,
    free_port,
    proc_cpu_seconds,
    proc_memory_kb,
    process_tree,
    progress,
    wait_until,
)

FORWARD_PORTS = (8000, 5555, 9187, 9121, 9182)  # the five defaults (docs/contracts.md)
PAGE_SIZE = 4096


def run(lab: Lab, hosts: int = 50, namespaces: int = 5, idle_seconds: float = 30.0,
        settle_seconds: float = 5.0) -> dict[str, Any]:
    progress(f"fleet: {namespaces} namespace sshd(s), {len(FORWARD_PORTS)} exporters each")
    spaces = [lab.host({port: PAGE_SIZE for port in FORWARD_PORTS}) for _ in range(namespaces)]
    aliases = [f"fleet-h{i:02d}" for i in range(hosts)]
    ssh_config = _write_ssh_config(lab, aliases, spaces)
    n_forwards = hosts * len(FORWARD_PORTS)

    first = _free_range(n_forwards)
    config = lab.workdir / "fleet.yml"
    config.write_text(f"local_port_range: [{first}, {first + n_forwards - 1}]\nhosts:\n" +
                      "".join(f"  - name: {alias}\n    ssh: {alias}\n" for alias in aliases))
    progress(f"fleet: one agent, {hosts} hosts x {len(FORWARD_PORTS)} forwards (--config {config.name})")
    agent = lab.agent(["-q", "-F", str(ssh_config), "--config", str(config)])
    agent_ports = list(range(first, first + n_forwards))

    progress(f"fleet: {hosts} autossh processes (the seed's command), {len(FORWARD_PORTS)} -L each")
    autossh_ports: list[int] = []
    autossh_pids: list[int] = []
    base = _free_range(n_forwards, avoid=set(agent_ports))
    for i, alias in enumerate(aliases):
        forwards: list[str] = []
        for j, remote in enumerate(FORWARD_PORTS):
            port = base + i * len(FORWARD_PORTS) + j
            autossh_ports.append(port)
            forwards += ["-L", f"127.0.0.1:{port}:127.0.0.1:{remote}"]
        proc, _ = lab.process(["autossh", "-M", "0", "-o", "ServerAliveInterval 30", "-o", "ServerAliveCountMax 3",
                               "-N", "-F", str(ssh_config), "-o", "BatchMode=yes", *forwards, alias],
                              f"fleet-autossh-{i:02d}.log")
        autossh_pids.append(proc.pid)

    def agent_ready() -> bool:
        agent.assert_running()
        samples = agent.metrics()
        up = sum(1 for k, v in samples.items() if k.startswith("tunnel_up{") and v == 1.0)
        fwd = sum(1 for k, v in samples.items() if k.startswith("tunnel_forward_up{") and v == 1.0)
        return up == hosts and fwd == n_forwards
    wait_until(agent_ready, 120, f"agent: {hosts} tunnels and {n_forwards} forwards up", interval=0.5)
    fetcher = lab.fetcher()
    page_len = len(_page())

    def all_answer(ports: list[int]) -> int:
        return sum(1 for p in ports if fetcher.get(p, timeout=5).get("bytes") == page_len)
    wait_until(lambda: all_answer(autossh_ports) == n_forwards, 120, f"{n_forwards} autossh forwards answering",
               interval=0.5)
    agent_exact = all_answer(agent_ports)
    autossh_exact = all_answer(autossh_ports)
    progress(f"fleet: all up; settling {settle_seconds:g}s, then measuring {idle_seconds:g}s idle")
    time.sleep(settle_seconds)  # let start-up work (first probes, handshakes) finish before the idle window

    def seed_pids() -> list[int]:
        return [p for pid in autossh_pids for p in process_tree(pid)]

    def ssh_only(pids: list[int]) -> list[int]:
        return [p for p in pids if p not in autossh_pids]

    agent_pid = agent.proc.pid
    seed_before = {p: proc_cpu_seconds(p) for p in seed_pids()}
    agent_cpu0, t0 = proc_cpu_seconds(agent_pid), time.monotonic()
    rss_samples: list[int] = []
    deadline = t0 + idle_seconds
    while time.monotonic() < deadline:  # the measurement window itself: sample RSS once a second
        rss_samples.append(proc_memory_kb(agent_pid)[0])
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    elapsed = time.monotonic() - t0
    agent_cpu = proc_cpu_seconds(agent_pid) - agent_cpu0
    pids_after = seed_pids()
    seed_cpu = sum(proc_cpu_seconds(p) - seed_before.get(p, 0.0) for p in pids_after)
    agent_rss, agent_pss = proc_memory_kb(agent_pid)
    seed_mem = [proc_memory_kb(p) for p in pids_after]
    ssh_mem = [proc_memory_kb(p) for p in ssh_only(pids_after)]
    return {
        "hosts": hosts, "namespaces": namespaces, "forwards": n_forwards, "idle_seconds": elapsed,
        "agent": {"processes": 1, "rss_mb": agent_rss / 1024, "pss_mb": agent_pss / 1024,
                  "rss_max_mb": max(rss_samples + [agent_rss]) / 1024,
                  "cpu_percent": 100 * agent_cpu / elapsed, "threads": _threads(agent_pid),
                  "fds": len(list(Path(f"/proc/{agent_pid}/fd").iterdir())), "forwards_ok": agent_exact},
        "autossh": {"processes": len(pids_after), "rss_mb": sum(r for r, _ in seed_mem) / 1024,
                    "pss_mb": sum(p for _, p in seed_mem) / 1024,
                    "ssh_only_rss_mb": sum(r for r, _ in ssh_mem) / 1024,
                    "ssh_only_pss_mb": sum(p for _, p in ssh_mem) / 1024,
                    "cpu_percent": 100 * seed_cpu / elapsed, "forwards_ok": autossh_exact},
        "goal": {"rss_mb": 80, "cpu_percent": 1.0}, "bar": {"rss_mb": 150, "cpu_percent": 3.0},
    }


def _page() -> bytes:
    from lab import expected_page
    return expected_page(PAGE_SIZE)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _write_ssh_config(lab: Lab, aliases: list[str], spaces: list[RemoteHost]) -> Path:
    """Host aliases spread round-robin over the namespace sshds (what agent/sshconfig.py honours)."""
    path = lab.workdir / "fleet_ssh_config"
    blocks = []
    for i, alias in enumerate(aliases):
        space = spaces[i % len(spaces)]
        blocks.append(f"Host {alias}\n    HostName {space.addr}\n    User root\n    Port 22\n"
                      f"    IdentityFile {lab.client_key}\n    IdentitiesOnly yes\n"
                      f"    UserKnownHostsFile {lab.known_hosts}\n    StrictHostKeyChecking yes\n")
    path.write_text("\n".join(blocks))
    return path


def _free_range(count: int, avoid: set[int] | None = None, attempts: int = 50) -> int:
    """The first port of `count` consecutive ports that are all free right now on 127.0.0.1."""
    avoid = avoid or set()
    rng = random.Random()
    for _ in range(attempts):
        first = rng.randrange(20000, 60000 - count)
        ports = range(first, first + count)
        if avoid.intersection(ports):
            continue
        if all(_port_free(p) for p in ports):
            return first
    return free_port()  # pragma: no cover - a crowded machine; the agent then says which port is taken


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def render(result: dict[str, Any]) -> str:
    a, s = result["agent"], result["autossh"]
    return "\n".join([
        f"Fleet: {result['hosts']} hosts x 5 forwards ({result['namespaces']} namespace sshds), "
        f"{result['idle_seconds']:.0f} s idle window",
        f"    {'':<26} {'procs':>5} {'RSS MB':>8} {'PSS MB':>8} {'CPU % core':>10} {'forwards ok':>12}",
        f"    {'agent (one process)':<26} {a['processes']:>5} {a['rss_mb']:8.1f} {a['pss_mb']:8.1f} "
        f"{a['cpu_percent']:10.2f} {a['forwards_ok']:>7}/{result['forwards']}",
        f"    {'autossh + ssh per host':<26} {s['processes']:>5} {s['rss_mb']:8.1f} {s['pss_mb']:8.1f} "
        f"{s['cpu_percent']:10.2f} {s['forwards_ok']:>7}/{result['forwards']}",
        f"    (ssh processes alone: RSS {s['ssh_only_rss_mb']:.1f} MB, PSS {s['ssh_only_pss_mb']:.1f} MB; "
        f"agent threads {a['threads']}, fds {a['fds']}, peak RSS {a['rss_max_mb']:.1f} MB; "
        f"goal <= {result['goal']['rss_mb']} MB and <= {result['goal']['cpu_percent']:g} %, "
        f"bar <= {result['bar']['rss_mb']} MB and <= {result['bar']['cpu_percent']:g} %)",
    ])
