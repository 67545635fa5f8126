"""The agent end to end through its real CLI, against real OpenSSH sshd in network namespaces."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from agent.config import DEFAULT_FORWARDS
from agent_process import TUNNEL, AgentProcess, fetch, free_port, wait_fetch
from remote_host import RemoteHost, keygen, wait_until

pytestmark = pytest.mark.netns


def page_name(body: bytes) -> str:
    """The exporter name embedded in a metrics_http.py page."""
    return body.split(b"# HELP ", 1)[1].split(b"_sample", 1)[0].decode()


def test_default_forwards_end_to_end_and_clean_sigterm(remote_host: RemoteHost):
    for name, port in DEFAULT_FORWARDS:
        remote_host.serve_metrics(port, size=2048, name=name)
    with AgentProcess.for_host(remote_host, []) as agent:  # no -L: the five defaults on the same ports
        agent.wait_up()
        for name, port in DEFAULT_FORWARDS:
            body = wait_fetch(f"http://127.0.0.1:{port}/metrics")
            assert page_name(body) == name, f"127.0.0.1:{port} reached the wrong exporter"
        wait_until(lambda: all(agent.value(f'tunnel_forward_up{{forward="{n}",host="{remote_host.addr}"}}') == 1
                               for n, _ in DEFAULT_FORWARDS), 20, "every forward probed up")
        threads_before_stop = len(list(Path(f"/proc/{agent.proc.pid}/task").iterdir()))
        assert threads_before_stop < 40
        assert agent.stop() == 0, agent.output()
    for _, port in DEFAULT_FORWARDS:  # listeners closed
        with pytest.raises(OSError):
            fetch(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_forward_counts_bytes_and_reports_metrics(remote_host: RemoteHost):
    remote_host.serve_metrics(9121, size=100_000, name="redis")
    local = free_port()
    with AgentProcess.for_host(remote_host, [f"{local}:127.0.0.1:9121"]) as agent:
        agent.wait_up()
        body = wait_fetch(f"http://127.0.0.1:{local}/metrics")
        assert len(body) >= 100_000 and page_name(body) == "redis"
        host = remote_host.addr
        wait_until(lambda: (agent.value(f'tunnel_forward_bytes_total{{direction="from_remote",forward="redis",'
                                        f'host="{host}"}}') or 0) >= len(body), 10, "bytes counted")
        wait_until(lambda: (agent.value(f'tunnel_ssh_rtt_seconds{{host="{host}"}}') or 0) > 0, 15,
                   "a keepalive round trip measured")
        metrics = agent.metrics()
        assert metrics[f'tunnel_up{{host="{host}"}}'] == 1
        assert any(k.startswith("tunnel_connect_duration_seconds_count") for k in metrics)
        assert agent.stop() == 0, agent.output()


def test_ssh_config_alias_through_a_jump_host(make_remote_host, tmp_path: Path):
    """The target's sshd is reachable only from the jump host (a link between the two namespaces)."""
    jump = make_remote_host()
    target = make_remote_host(start=False, client_key=jump.client_key)
    inner_jump, inner_target = f"10.254.{target.index % 250}.1", f"10.254.{target.index % 250}.2"
    a, b = f"tj{target.index}a", f"tj{target.index}b"
    subprocess.run(["ip", "link", "add", a, "netns", jump.ns, "type", "veth", "peer", "name", b, "netns", target.ns],
                   check=True)
    jump.exec(["ip", "addr", "add", f"{inner_jump}/30", "dev", a])
    jump.exec(["ip", "link", "set", a, "up"])
    target.exec(["ip", "addr", "add", f"{inner_target}/30", "dev", b])
    target.exec(["ip", "link", "set", b, "up"])
    target.sshd_extra.append(f"ListenAddress {inner_target}:22")
    target.start_sshd()
    target.serve_metrics(9187, name="postgres")
    known = tmp_path / "known_hosts"
    known.write_text(jump.known_hosts_line() + target.known_hosts_line().replace(target.addr, inner_target))
    config = tmp_path / "ssh_config"
    config.write_text(f"Host prod-db\n  HostName {inner_target}\n  User root\n  ProxyJump bastion\n"
                      f"  IdentityFile {jump.client_key}\n  UserKnownHostsFile {known}\n"
                      f"Host bastion\n  HostName {jump.addr}\n  User root\n  IdentityFile {jump.client_key}\n"
                      f"  UserKnownHostsFile {known}\n")
    local = free_port()
    with AgentProcess(["-q", "-F", str(config), "-L", f"{local}:127.0.0.1:9187", "prod-db"], tmp_path) as agent:
        agent.wait_up()
        assert page_name(wait_fetch(f"http://127.0.0.1:{local}/metrics")) == "postgres"
        assert agent.value('tunnel_up{host="prod-db"}') == 1
        assert agent.stop() == 0, agent.output()


def _agent_error(agent: AgentProcess, reason: str) -> str:
    wait_until(lambda: any(k.startswith("tunnel_last_error_info") and f'reason="{reason}"' in k
                           for k in agent.metrics()), 20, f"reason {reason} in the metrics")
    return agent.output()


def test_unknown_host_key_is_refused_and_never_forwards(remote_host: RemoteHost):
    remote_host.serve_metrics(9121)
    empty = remote_host.workdir / "empty_known_hosts"
    empty.write_text("")
    local = free_port()
    with AgentProcess.for_host(remote_host, [f"{local}:127.0.0.1:9121"], known_hosts=empty) as agent:
        log = _agent_error(agent, "host_key_unknown")
        assert "is not known" in log and "ssh-keyscan" in log and "Traceback" not in log
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            fetch(f"http://127.0.0.1:{local}/metrics", timeout=5)
        assert empty.read_text() == ""
        assert agent.stop() == 0, agent.output()


def test_changed_host_key_is_refused_loudly(remote_host: RemoteHost):
    remote_host.serve_metrics(9121)
    known = remote_host.workdir / "known_hosts_changed"
    other = keygen(remote_host.workdir / "other_host_key")
    known.write_text(f"{remote_host.addr} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]) + "\n")
    local = free_port()
    with AgentProcess.for_host(remote_host, [f"{local}:127.0.0.1:9121"], "-o", "StrictHostKeyChecking=accept-new",
                               known_hosts=known) as agent:
        log = _agent_error(agent, "host_key_changed")
        assert "HOST KEY CHANGED" in log and "ssh-keygen -R" in log
        with pytest.raises(OSError):
            fetch(f"http://127.0.0.1:{local}/metrics", timeout=5)
        assert agent.stop() == 0, agent.output()


def test_accept_new_records_the_key_and_connects(remote_host: RemoteHost):
    remote_host.serve_metrics(9121, name="redis")
    known = remote_host.workdir / "tofu_known_hosts"
    local = free_port()
    with AgentProcess.for_host(remote_host, [f"{local}:127.0.0.1:9121"], "-o", "StrictHostKeyChecking=accept-new",
                               known_hosts=known) as agent:
        agent.wait_up()
        assert page_name(wait_fetch(f"http://127.0.0.1:{local}/metrics")) == "redis"
        assert known.read_text().split()[:2] == remote_host.known_hosts_line().split()[:2]
        assert agent.stop() == 0, agent.output()


def check(remote_host: RemoteHost, *forwards: str) -> subprocess.CompletedProcess:
    known = remote_host.workdir / "known_hosts"
    known.write_text(remote_host.known_hosts_line())
    args = ["--check", "-F", "none", "-i", str(remote_host.client_key), "-o", f"UserKnownHostsFile={known}"]
    for spec in forwards:
        args += ["-L", spec]
    return subprocess.run([sys.executable, str(TUNNEL), *args, f"root@{remote_host.addr}"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_check_reports_each_step(remote_host: RemoteHost):
    remote_host.serve_metrics(9121, size=3000, name="redis")
    ok = check(remote_host, f"{free_port()}:127.0.0.1:9121")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for step in ("dns", "tcp connect", "ssh banner", "host key", "authentication", "forward redis"):
        assert any(line.split()[1:3] and step in line and " ok " in line for line in ok.stdout.splitlines()), step
    assert "samples" in ok.stdout and "SSH-2.0-OpenSSH" in ok.stdout

    bad = check(remote_host, f"{free_port()}:127.0.0.1:9121", f"{free_port()}:127.0.0.1:9182")
    assert bad.returncode == 1
    failing = [line for line in bad.stdout.splitlines() if "FAIL" in line]
    assert len(failing) == 1 and "forward windows" in failing[0] and "connect failed" in failing[0]
    assert "hint: start the exporter" in bad.stdout


def test_demo_runs_the_whole_chain(tmp_path: Path):
    ports = {name: free_port() for name, _ in DEFAULT_FORWARDS}
    forwards = [f"{ports[name]}:127.0.0.1:{port}" for name, port in DEFAULT_FORWARDS]
    sd_file = tmp_path / "targets.json"
    with AgentProcess(["--demo", "-q", "--sd-file", str(sd_file), *sum((["-L", f] for f in forwards), [])],
                      tmp_path) as agent:
        agent.wait_up()
        api = wait_fetch(f"http://127.0.0.1:{ports['api']}/metrics").decode()
        for metric in ("http_requests_total{", "http_request_duration_seconds_bucket{", "http_requests_in_progress"):
            assert metric in api
        assert "redis_key_size" in wait_fetch(f"http://127.0.0.1:{ports['redis']}/metrics").decode()
        targets = json.loads(sd_file.read_text())
        assert {t["labels"]["job"] for t in targets} == set(ports)
        assert "http://127.0.0.1:" in agent.output() and "Ctrl-C" in agent.output()
        assert agent.stop() == 0, agent.output()


def test_sighup_reload_touches_only_changed_hosts(make_remote_host, tmp_path: Path):
    kept, removed, added = make_remote_host(), make_remote_host(), make_remote_host()
    for host in (kept, removed, added):
        host.serve_metrics(9121, name="redis")
    known = tmp_path / "known_hosts"
    known.write_text("".join(h.known_hosts_line() for h in (kept, removed, added)))

    def host_entry(name: str, host: RemoteHost) -> str:
        return (f"  - {{name: {name}, ssh: root@{host.addr}, identity_file: {host.client_key}, "
                f"known_hosts: {known}, forwards: [redis]}}\n")

    config = tmp_path / "hosts.yml"
    sd_file = tmp_path / "targets.json"
    start = free_port()
    head = f"local_port_range: [{start}, {start + 20}]\nsd_file: {sd_file}\nhosts:\n"
    config.write_text(head + host_entry("kept", kept) + host_entry("removed", removed))
    with AgentProcess(["-q", "-F", "none", "--config", str(config)], tmp_path) as agent:
        wait_until(lambda: agent.value('tunnel_up{host="kept"}') == 1 and agent.value('tunnel_up{host="removed"}') == 1,
                   20, "both hosts up")
        kept_port = next(t for t in json.loads(sd_file.read_text()) if t["labels"]["host"] == "kept")["targets"][0]
        connects = agent.value('tunnel_connect_duration_seconds_count{host="kept"}')
        config.write_text(head + host_entry("kept", kept) + host_entry("added", added))
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: agent.value('tunnel_up{host="added"}') == 1, 20, "added host up")
        wait_until(lambda: agent.value('tunnel_up{host="removed"}') is None, 10, "removed host gone")
        assert agent.value('tunnel_connect_duration_seconds_count{host="kept"}') == connects, "kept host reconnected"
        targets = json.loads(sd_file.read_text())
        assert {t["labels"]["host"] for t in targets} == {"kept", "added"}
        assert next(t for t in targets if t["labels"]["host"] == "kept")["targets"][0] == kept_port
        assert page_name(wait_fetch(f"http://{kept_port}/metrics")) == "redis"
        config.write_text("hosts: [oops\n")  # a broken config keeps the running one
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed, keeping the running config" in agent.output(), 10, "reload error")
        assert agent.value('tunnel_up{host="added"}') == 1
        assert agent.stop() == 0, agent.output()


def test_keys_from_ssh_agent_are_used(remote_host: RemoteHost, tmp_path: Path):
    """A passphrase-protected key is fine when ssh-agent holds it (no -i, no key file read)."""
    locked = keygen(tmp_path / "locked_key", passphrase="correct horse battery")
    remote_host.authorized_keys.write_text(Path(f"{locked}.pub").read_text())
    remote_host.serve_metrics(9121, name="redis")
    sock = tmp_path / "agent.sock"
    ssh_agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "ssh-agent socket")
        _ssh_add(locked, sock)
        known = tmp_path / "known_hosts"
        known.write_text(remote_host.known_hosts_line())
        local = free_port()
        args = ["-q", "-F", "none", "-o", f"UserKnownHostsFile={known}", "-L", f"{local}:127.0.0.1:9121",
                f"root@{remote_host.addr}"]
        with AgentProcess(args, tmp_path, env={"SSH_AUTH_SOCK": str(sock), "HOME": str(tmp_path)}) as agent:
            agent.wait_up()
            assert page_name(wait_fetch(f"http://127.0.0.1:{local}/metrics")) == "redis"
            assert agent.stop() == 0, agent.output()
    finally:
        ssh_agent.terminate()
        ssh_agent.wait(5)


def _ssh_add(key: Path, sock: Path) -> None:
    """ssh-add a passphrase-protected key non-interactively (the passphrase comes from an askpass script)."""
    askpass = key.parent / "askpass.sh"
    askpass.write_text("#!/bin/sh\necho 'correct horse battery'\n")
    askpass.chmod(0o700)
    subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL,
                   env={"SSH_AUTH_SOCK": str(sock), "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
                        "DISPLAY": ":0", "PATH": "/usr/bin:/bin"})


def test_connection_refused_is_reported_and_retried(remote_host: RemoteHost):
    remote_host.stop_sshd()
    local = free_port()
    with AgentProcess.for_host(remote_host, [f"{local}:127.0.0.1:9121"]) as agent:
        log = _agent_error(agent, "refused")
        assert f"connection to {remote_host.addr}:22 refused: is sshd running there" in log
        remote_host.start_sshd()
        remote_host.serve_metrics(9121, name="redis")
        agent.wait_up(timeout=45)  # the backoff is capped at 30 s
        assert page_name(wait_fetch(f"http://127.0.0.1:{local}/metrics")) == "redis"
        assert agent.stop() == 0, agent.output()
