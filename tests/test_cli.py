"""Bad input through the real CLI: one line naming the problem and the fix, exit status 2, no traceback."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent_process import TUNNEL, free_port

NO_CONFIG = ["-F", "none", "--metrics", "off"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TUNNEL), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "HOME": str(Path.cwd()), **(env or {})})


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnel: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _no_ssh_agent(monkeypatch, tmp_path):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.chdir(tmp_path)  # HOME for the CLI: no ~/.ssh/config, no default config


def key(tmp_path: Path, passphrase: str = "") -> Path:
    path = tmp_path / f"key{len(passphrase)}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True)
    return path


@pytest.mark.parametrize("args, fragments", [
    (["bad user@host"], ["malformed", "[user@]host[:port]"]),
    (["user@host:99999"], ["out of range", "1-65535"]),
    (["-p", "0", "host"], ["-p port 0 is out of range"]),
    (["-L", "9121", "host"], ["-L '9121' is malformed", "localport:remotehost:remoteport"]),
    (["-L", "1:127.0.0.1:2", "-L", "1:127.0.0.1:3", "host"], ["given twice"]),
    (["-o", "Compression=yes", "host"], ["-o Compression is not supported"]),
    (["-o", "ServerAliveCountMax=0", "host"], ["ServerAliveCountMax=0", ">= 1"]),
    (["-o", "StrictHostKeyChecking=maybe", "host"], ["yes (default) or accept-new"]),
    (["-F", "/nonexistent/ssh_config", "host"], ["ssh config file /nonexistent/ssh_config does not exist"]),
    (["-i", "/nonexistent/key", "host"], ["identity file /nonexistent/key does not exist"]),
    (["--config", "/nonexistent.yml"], ["config file /nonexistent.yml does not exist"]),
    ([], ["no destination", "--demo"]),
    (["--bogus"], ["unrecognized arguments", "--help"]),
    (["--metrics", "127.0.0.1:http", "host"], ["--metrics port"]),
    (["--connect-wait", "-1", "host"], ["--connect-wait"]),
    (["--connect-wait", "inf", "host"], ["--connect-wait inf", "0-300"]),
    (["--connect-wait", "nan", "host"], ["--connect-wait nan"]),
    (["-F", "/", "host"], ["ssh config file / is a directory", "-F none"]),
    (["-J", "", "host"], ["-J needs a jump host"]),
])
def test_bad_input(args, fragments):
    assert_usage_error(run(*NO_CONFIG[:2], *args), *fragments)


def test_public_key_given_instead_of_private(tmp_path):
    private = key(tmp_path)
    assert_usage_error(run(*NO_CONFIG, "-i", f"{private}.pub", "host"), "not a usable private key", "not the .pub")


def test_unreadable_key(tmp_path):
    private = key(tmp_path)
    private.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make it a directory instead, also unreadable as a key
        private.unlink()
        private.mkdir()
    result = run(*NO_CONFIG, "-i", str(private), "host")
    assert_usage_error(result, str(private))


def test_passphrase_key_without_agent(tmp_path):
    locked = key(tmp_path, passphrase="correct horse")
    assert_usage_error(run(*NO_CONFIG, "-i", str(locked), "host"), "passphrase-protected", "ssh-add")


def test_malformed_ssh_config(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host prod\n  ServerAliveInterval often\n")
    assert_usage_error(run("-F", str(config), "--metrics", "off", "prod"), "ServerAliveInterval=often")


def test_bad_yaml_names_the_line(tmp_path):
    config = tmp_path / "hosts.yml"
    config.write_text("hosts:\n  - name: a\n    ssh: h\n    colour: red\n")
    assert_usage_error(run("--config", str(config), "-F", "none", "--metrics", "off"),
                       f"{config}:4:", "unknown key 'colour'")


@pytest.mark.parametrize("line, fragments", [
    ("probe_interval: .nan", ["probe_interval", "must be a number"]),
    ("probe_interval: .inf", ["probe_interval", "must be a number"]),
    ("connect_wait: -5", ["connect_wait", "must be a number from 0"]),
])
def test_bad_yaml_numbers_are_usage_errors(tmp_path, line, fragments):
    config = tmp_path / "hosts.yml"
    config.write_text(f"{line}\nhosts:\n  - {{name: a, ssh: h}}\n")
    assert_usage_error(run("--config", str(config), "-F", "none", "--metrics", "off"), f"{config}:1:", *fragments)


def test_flower_password_file_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "flower.pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    config = tmp_path / "hosts.yml"
    config.write_text(f"hosts:\n  - name: a\n    ssh: h\n    flower_auth: {{username: u, password_file: {secret}}}\n")
    assert_usage_error(run("--config", str(config), "-F", "none", "--metrics", "off"), "readable by other users",
                       f"chmod 600 {secret}")


def test_proxycommand_is_refused_with_the_fix(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host prod\n  HostName 192.0.2.1\n  ProxyCommand nc -X 5 -x proxy:1080 %h %p\n")
    assert_usage_error(run("-F", str(config), "--metrics", "off", "prod"), "ProxyCommand", "ProxyJump")


def test_exposed_listener_is_warned_about(tmp_path):
    private = key(tmp_path)
    port = free_port()
    agent = subprocess.Popen([sys.executable, str(TUNNEL), *NO_CONFIG, "-i", str(private), "-o", "ConnectTimeout=1",
                              "-L", f"0.0.0.0:{port}:127.0.0.1:9121", "192.0.2.1"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HOME": str(tmp_path)})
    try:
        assert agent.stderr is not None
        ready, _, _ = select.select([agent.stderr], [], [], 20)  # bounded: never hang on a silent agent
        first = agent.stderr.readline() if ready else ""  # the warning comes when the listener is bound
    finally:
        agent.terminate()
        agent.wait(10)
        if agent.stderr:
            agent.stderr.close()
    assert "listens on 0.0.0.0, not 127.0.0.1" in first, first


def test_local_port_in_use(tmp_path):
    private = key(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(*NO_CONFIG, "-i", str(private), "-L", f"{port}:127.0.0.1:9121", "host.invalid")
    assert_usage_error(result, f"local port 127.0.0.1:{port}", "already in use", "ss -ltnp")


def test_metrics_port_in_use(tmp_path):
    private = key(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("-F", "none", "-i", str(private), "--metrics", str(port), "-L",
                     f"{free_port()}:127.0.0.1:9121", "host.invalid")
    assert_usage_error(result, f"127.0.0.1:{port}", "--metrics")


def test_version_and_help():
    from agent import __version__

    assert run("--version").stdout.strip() == f"tunnel {__version__}"
    help_text = run("--help").stdout
    for flag in ("-L", "-J", "-F", "-o", "--config", "--metrics", "--demo", "--check", "StrictHostKeyChecking"):
        assert flag in help_text


def test_unresolvable_host_is_one_line_and_keeps_retrying(tmp_path):
    """A DNS failure at run time is not a usage error: the agent reports it and retries (no traceback)."""
    private = key(tmp_path)
    proc = subprocess.Popen([sys.executable, str(TUNNEL), "-q", *NO_CONFIG, "-i", str(private), "-L",
                             f"{free_port()}:127.0.0.1:9121", "nosuchhost.invalid"], stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        line = proc.stderr.readline() if proc.stderr else ""
        assert "cannot resolve 'nosuchhost.invalid'" in line and "HostName" in line and "retry in" in line
        assert proc.poll() is None, "the agent must keep running and retry"
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=15)
    assert proc.returncode == 0 and "Traceback" not in rest
