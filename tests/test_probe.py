"""Forward probes on SSH channels (agent/probe.py), in-process against a real sshd in a namespace host.

- Outcomes: 200 -> up; 500 -> down; 401 -> down with the basic-auth hint, up with the right credentials;
  nothing listening -> the channel error; PermitOpen refusal -> "administratively prohibited".
- A slow exporter (one scrape at a time, ~2 s each) never gets a second probe while one is running.
- Passive health: a round after real traffic through the forward (or after an HTTP answer another
  reader got, `Prober.answered`) sends no probe; a forward is still probed every PASSIVE_MAX_ROUNDS rounds.
"""
from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from agent_process import free_port
from remote_host import RemoteHost, require, wait_until

pytestmark = pytest.mark.netns

SERVER = r'''
import base64, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, mode, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock, state = threading.Lock(), {"now": 0, "max": 0}
def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        with lock:
            state["now"] += 1; state["max"] = max(state["max"], state["now"])
        try:
            note(f"GET {self.headers.get('User-Agent', '')} max={state['max']}")
            status = 200
            if mode == "500": status = 500
            if mode == "auth" and self.headers.get("Authorization") != "Basic " + base64.b64encode(b"mon:pw").decode():
                status = 401
            if mode == "slow": time.sleep(2.0)
            body = b"up 1\n" * 100
            self.send_response(status); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        finally:
            with lock: state["now"] -= 1
server = ThreadingHTTPServer(("127.0.0.1", port), H)
print("ready", flush=True)
server.serve_forever()
'''

PORTS = {"ok": 9101, "err": 9102, "auth": 9103, "slow": 9104, "none": 9105, "denied": 9106}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[RemoteHost]:
    require(("ip", "/usr/sbin/sshd", "ssh-keygen", "iptables"))
    with RemoteHost(tmp_path / "host") as remote:
        allowed = " ".join(f"127.0.0.1:{p}" for n, p in PORTS.items() if n != "denied")
        remote.sshd_extra.append(f"PermitOpen {allowed}")
        remote.start_sshd()
        script = tmp_path / "server.py"
        script.write_text(SERVER)
        for name, mode in (("ok", "ok"), ("err", "500"), ("auth", "auth"), ("slow", "slow"), ("denied", "ok")):
            proc = remote.spawn([sys.executable, str(script), str(PORTS[name]), mode, str(tmp_path / f"{name}.log")],
                                stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready", f"{name} server"
        yield remote


@pytest.fixture
def tunnel(host: RemoteHost, tmp_path: Path):
    from agent.auth import load_identities
    from agent.config import Forward, HostConfig
    from agent.forward import Acceptor
    from agent.supervisor import HostTunnel

    known = tmp_path / "known_hosts"
    known.write_text(host.known_hosts_line())
    forwards = tuple(Forward(name=n, remote_port=p, local_port=free_port(), bind="127.0.0.1",
                             basic_auth=("mon", "pw") if n == "authok" else None)
                     for n, p in [*PORTS.items(), ("authok", PORTS["auth"])])
    config = HostConfig(name="h", hostname=host.addr, user="root", identity_files=(str(host.client_key),),
                        identities_only=True, known_hosts_files=(str(known),), forwards=forwards)
    acceptor = Acceptor()
    tun = HostTunnel(config, load_identities(config.identity_files, True), acceptor)
    try:
        tun.bind()
        tun.start()
        wait_until(lambda: tun.stats.state == "up", 20, "SSH up")
        yield tun
    finally:
        tun.stop()
        acceptor.close()


def _hits(tmp_path: Path, name: str) -> list[str]:
    log = tmp_path / f"{name}.log"
    return log.read_text().splitlines() if log.exists() else []


def test_probe_outcomes(tunnel, tmp_path: Path) -> None:
    from agent.probe import probe_forward

    f = tunnel.forwards
    assert probe_forward(tunnel, f["ok"]) and f["ok"].probe_detail.startswith("HTTP 200")
    assert any("tunnel-agent-probe" in line for line in _hits(tmp_path, "ok"))
    assert not probe_forward(tunnel, f["err"]) and f["err"].probe_detail == "exporter answered HTTP 500"
    assert not probe_forward(tunnel, f["auth"])
    assert "HTTP 401: set basic auth for auth" in f["auth"].probe_detail
    assert probe_forward(tunnel, f["authok"]), f["authok"].probe_detail
    assert not probe_forward(tunnel, f["none"])
    assert "connect failed" in f["none"].probe_detail and f["none"].last_error_reason == "connect_failed"
    assert not probe_forward(tunnel, f["denied"])
    assert "administratively prohibited" in f["denied"].probe_detail
    assert f["denied"].last_error_reason == "administratively_prohibited"
    assert not _hits(tmp_path, "denied")
    for stats in f.values():  # probes are not traffic: the forward's counters stay for real connections
        assert stats.accepted_total == 0 and stats.bytes_from_remote == 0


def test_slow_exporter_gets_one_probe_at_a_time(tunnel, tmp_path: Path) -> None:
    from agent.probe import Prober

    slow = tunnel.forwards["slow"]
    prober = Prober(lambda: [tunnel], interval=1)
    prober.start()
    try:
        wait_until(lambda: len(_hits(tmp_path, "slow")) >= 3, 20, "three probes of the slow exporter")
        assert slow.probe_ok, slow.probe_detail
    finally:
        prober.stop()
    hits = _hits(tmp_path, "slow")
    assert all(line.endswith("max=1") for line in hits), hits  # never two probes in flight at once


def test_traffic_through_the_forward_replaces_probes(tunnel, tmp_path: Path) -> None:
    from agent.probe import PASSIVE_MAX_ROUNDS, Prober

    ok = tunnel.forwards["ok"]
    prober = Prober(lambda: [tunnel], interval=3600)  # rounds driven by hand, not started

    def round_probes() -> int:
        before = len(_hits(tmp_path, "ok"))
        prober.probe_all()
        wait_until(lambda: not prober._in_flight, 10, "round done")
        return len(_hits(tmp_path, "ok")) - before

    def scrape() -> None:
        url = f"http://127.0.0.1:{ok.forward.local_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200 and response.read()
        wait_until(lambda: ok.active == 0, 5, "scrape connection closed")

    try:
        assert round_probes() == 1 and ok.probe_ok
        assert round_probes() == 1, "no traffic: probed actively"
        for _ in range(PASSIVE_MAX_ROUNDS - 1):
            scrape()
            assert round_probes() == 0, "traffic proved the path: no probe"
        scrape()
        assert round_probes() == 1, f"still probed actively every {PASSIVE_MAX_ROUNDS} rounds"
        assert ok.probe_ok
        prober.answered(ok, 200)  # another reader (the Celery collector) got an answer through that port
        assert round_probes() == 0, "an answer to another reader proved the path: no probe"
        prober.answered(ok, 500)
        assert round_probes() == 1, "an error answer proves nothing"
    finally:
        prober.stop()
