"""server-side/: the restricted tunnel account (live, real sshd) and "nothing listens beyond 127.0.0.1".

The account tests log in as a real user `tunnel` whose only powers come from
server-side/sshd/tunnel-account.conf (or, in the second variant, from the authorized_keys options of
server-side/sshd/authorized_keys.example): direct-tcpip channels to the five exporter ports work, any
other port (and "localhost" instead of 127.0.0.1) is administratively prohibited, and a shell, a
command and a remote forward get nothing.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import paramiko
import pytest
import yaml

from pipeline_host import SERVER_SIDE, TUNNEL_FRAGMENT, traversable_workdir, tunnel_account
from remote_host import RemoteHost, require

pytestmark = pytest.mark.netns

ALLOWED = (8000, 5555, 9187, 9121, 9182)
SSHD = "/usr/sbin/sshd"
EXAMPLE_KEYS = SERVER_SIDE / "sshd" / "authorized_keys.example"


# -- the fragment, statically, through sshd itself ---------------------------------------------------------
def _sshd_config(tmp_path: Path, extra: str) -> Path:
    key = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {key}\nPidFile none\n{extra}")
    return config


def test_sshd_accepts_the_fragment_and_applies_it_to_the_tunnel_user_only(tmp_path: Path) -> None:
    require([SSHD, "ssh-keygen"])
    config = _sshd_config(tmp_path, TUNNEL_FRAGMENT.read_text())
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)

    def effective(user: str) -> dict[str, str]:
        out = subprocess.run([SSHD, "-T", "-f", str(config), "-C", f"user={user},host=x,addr=127.0.0.1"],
                             check=True, capture_output=True, text=True).stdout
        return {k: v for k, _, v in (line.partition(" ") for line in out.splitlines())}

    tunnel = effective("tunnel")
    assert tunnel["permitopen"].split() == [f"127.0.0.1:{p}" for p in ALLOWED]
    expected = {"allowtcpforwarding": "local", "permitlisten": "none", "permittty": "no", "x11forwarding": "no",
                "allowagentforwarding": "no", "allowstreamlocalforwarding": "no", "permittunnel": "no",
                "gatewayports": "no", "permituserrc": "no", "forcecommand": "/bin/false"}
    assert {k: tunnel[k] for k in expected} == expected
    other = effective("deploy")
    assert other["allowtcpforwarding"] == "yes" and other.get("forcecommand", "none") == "none"


def test_authorized_keys_example_is_one_valid_line_per_key() -> None:
    lines = [ln for ln in EXAMPLE_KEYS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    options, keytype, _key, *_ = lines[0].split(" ")
    assert keytype == "ssh-ed25519"
    opens = re.findall(r'permitopen="([^"]+)"', options)
    assert opens == [f"127.0.0.1:{p}" for p in ALLOWED]
    assert options.startswith("restrict,port-forwarding,") and 'command="/bin/false"' in options


# -- the account, live ---------------------------------------------------------------------------------
@pytest.fixture(params=["sshd_config", "authorized_keys"])
def tunnel_host(request: pytest.FixtureRequest) -> Iterator[tuple[RemoteHost, str]]:
    """A namespace host where user `tunnel` is restricted by the fragment or by the key options, with an
    HTTP server on each allowed port and on two ports that are not allowed (22 is sshd itself)."""
    require(["ip", SSHD, "ssh-keygen", "ssh", "useradd", "userdel"])
    workdir = traversable_workdir()
    try:
        with RemoteHost(workdir) as host, tunnel_account(host) as user:
            if request.param == "authorized_keys":
                host.sshd_extra = []  # no Match block: the key options alone
                options = EXAMPLE_KEYS.read_text().splitlines()[-1].split(" ")[0]
                host.authorized_keys.write_text(f"{options} {Path(f'{host.client_key}.pub').read_text()}")
            host.authorized_keys.chmod(0o644)
            for port in (*ALLOWED, 6379, 5432):
                host.serve_metrics(port, size=64, name=f"port{port}")
            host.start_sshd()
            yield host, user
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _transport(host: RemoteHost, user: str) -> paramiko.Transport:
    sock = socket.create_connection((host.addr, host.sshd_port), timeout=5)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=10)
    key = paramiko.Ed25519Key.from_private_key_file(str(host.client_key))
    transport.auth_publickey(user, key)
    return transport


def _http_over(channel: paramiko.Channel) -> bytes:
    channel.settimeout(5)
    channel.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := channel.recv(65536):
        data += chunk
    channel.close()
    return data


def _ssh(host: RemoteHost, user: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    known = host.workdir / "known_hosts"
    known.write_text(host.known_hosts_line())
    command = ["ssh", "-F", "none", "-i", str(host.client_key), "-o", "IdentitiesOnly=yes", "-o",
               f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=5", *args, f"{user}@{host.addr}"]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=20)


def test_tunnel_account_forwards_to_the_five_ports_only(tunnel_host: tuple[RemoteHost, str]) -> None:
    host, user = tunnel_host
    transport = _transport(host, user)
    try:
        for port in ALLOWED:
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 40000), timeout=5)
            page = _http_over(channel)
            assert page.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) and f"port{port}".encode() in page, page[:200]
        for dest in (("127.0.0.1", 6379), ("127.0.0.1", 5432), ("127.0.0.1", 22), ("localhost", 8000),
                     (host.addr, 22), ("10.255.255.1", 80)):
            with pytest.raises(paramiko.ChannelException) as refused:
                transport.open_channel("direct-tcpip", dest, ("127.0.0.1", 40000), timeout=5)
            assert refused.value.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, dest
    finally:
        transport.close()


def test_tunnel_account_gets_no_shell_no_command(tunnel_host: tuple[RemoteHost, str]) -> None:
    host, user = tunnel_host
    marker = "echo RAN-$((6*7)); id"
    command = _ssh(host, user, marker)
    assert command.returncode != 0 and "RAN-42" not in command.stdout, command
    shell = _ssh(host, user, "-tt", stdin=f"{marker}\nexit\n")
    assert shell.returncode != 0 and "RAN-42" not in shell.stdout, shell
    # a plain `ssh -N` tunnel (what the agent does) is allowed: it asks for no session at all
    transport = _transport(host, user)
    try:
        session = transport.open_session(timeout=5)
        session.exec_command("echo RAN-$((6*7))")
        session.settimeout(5)
        assert b"RAN-42" not in session.makefile().read() and session.recv_exit_status() != 0
    finally:
        transport.close()


def test_tunnel_account_remote_forward(tunnel_host: tuple[RemoteHost, str], request: pytest.FixtureRequest
                                       ) -> None:
    """-R is refused by the sshd_config fragment (AllowTcpForwarding local, PermitListen none); key options
    alone cannot refuse it (`port-forwarding` re-allows both directions and sshd rejects a key with
    permitlisten="none"), which is why server-side/README.md makes the fragment mandatory."""
    host, user = tunnel_host
    if request.node.callspec.params["tunnel_host"] == "authorized_keys":
        transport = _transport(host, user)
        try:
            port = transport.request_port_forward("127.0.0.1", 0)
            assert port > 0, "the known limitation of key options changed: update server-side/README.md"
        finally:
            transport.close()
        return
    result = _ssh(host, user, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:22")
    assert result.returncode != 0
    assert "remote port forwarding failed" in result.stderr.lower(), result.stderr


# -- nothing listens beyond 127.0.0.1 (static) ------------------------------------------------------------
def _loopback(addr: str) -> bool:
    return addr.startswith("127.0.0.1:") or addr == "127.0.0.1"


def test_compose_publishes_every_port_on_loopback_only() -> None:
    compose = yaml.safe_load((SERVER_SIDE / "compose.yaml").read_text())
    services = compose["services"]
    assert {"flower", "postgres-exporter", "redis-exporter"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        image = service.get("image", "")
        assert re.search(r":v?[0-9][\w.-]*(@sha256:[0-9a-f]{64})?$", image), f"{name}: image {image!r} not pinned"
        assert "mem_limit" in service or "memory" in str(service.get("deploy", "")), f"{name}: no memory limit"
        assert "healthcheck" in service, f"{name}: no healthcheck"
        assert "network_mode" not in service or service["network_mode"] != "host" or not service.get("ports")
    for name, service in services.items():  # secrets only by interpolation from the git-ignored .env
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("AUTH", "PASS", "SECRET")):
                assert str(value).startswith("${"), f"{name}: literal {key} in compose.yaml"
    assert "FLOWER_BASIC_AUTH=" in (SERVER_SIDE / ".env.example").read_text()
    assert ".env" in (SERVER_SIDE / ".gitignore").read_text().split()
    redis_cmd = " ".join(services["redis-exporter"]["command"])
    assert "--check-single-keys=db0=celery" in redis_cmd


def test_linux_units_and_settings_bind_loopback_only() -> None:
    linux = SERVER_SIDE / "linux"
    texts = {p.name: p.read_text() for p in linux.rglob("*") if p.is_file()}
    assert {"prometheus-redis-exporter", "prometheus-postgres-exporter", "celery-flower",
            "celery-flower.service"} <= set(texts), sorted(texts)
    assert "-check-single-keys db0=celery" in texts["prometheus-redis-exporter"]
    for unit in (p for p in linux.rglob("*.service")):  # systemd-analyze-like sanity: the sections exist
        assert re.search(r"^\[Service\]$", unit.read_text(), re.M) and "ExecStart=" in unit.read_text()
    listen = re.compile(r"(?:listen-address|address|--bind|ADDRESS)[= ]+\"?([\w.:\[\]]+)")
    found = 0
    for name, text in texts.items():
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for addr in listen.findall(line):
                found += 1
                assert _loopback(addr), f"{name}: {line.strip()}"
    assert found >= 3
    windows = yaml.safe_load((SERVER_SIDE / "windows" / "windows_exporter.yml").read_text())
    assert windows["web"]["listen-address"] == "127.0.0.1:9182"
    assert "cpu" in windows["collectors"]["enabled"]


# -- the reference pipeline's API on a real server (port 0), without broker or database --------------------
@pytest.fixture
def pipeline_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """server-side/ on sys.path for this test only; yields the `pipeline` package."""
    import importlib

    monkeypatch.syspath_prepend(str(SERVER_SIDE))
    yield importlib.import_module("pipeline")


def test_pipeline_settings_reject_bad_values_in_one_line(pipeline_modules: object) -> None:
    from pipeline import settings  # type: ignore[import-not-found]

    assert settings.load({}).api_addr == "127.0.0.1:8000" and settings.load({}).admin is False
    loaded = settings.load({"PIPELINE_API_ERROR_RATE": "0.25", "PIPELINE_TASK_SECONDS": "3", "PIPELINE_ADMIN": "1"})
    assert (loaded.api_error_rate, loaded.task_seconds, loaded.admin) == (0.25, 3.0, True)
    for env in ({"PIPELINE_API_ERROR_RATE": "2"}, {"PIPELINE_TASK_FAILURE_RATE": "lots"},
                {"PIPELINE_TASK_SECONDS": "soon"}):
        with pytest.raises(SystemExit) as bad:
            settings.load(env)
        assert "\n" not in str(bad.value) and next(iter(env)) in str(bad.value)


def test_pipeline_api_metrics_routes_and_fault_injection(pipeline_modules: object) -> None:
    import threading
    import urllib.error
    import urllib.request
    from http.server import ThreadingHTTPServer

    from pipeline import api, settings  # type: ignore[import-not-found]

    from agent_process import parse_metrics

    enqueued: list[float | None] = []

    def enqueue(seconds: float | None) -> str:
        enqueued.append(seconds)
        return f"task-{len(enqueued)}"

    conf = settings.load({"PIPELINE_ADMIN": "1"})
    metrics, faults = api.ApiMetrics(), api.FaultInjector(0.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), api.make_handler(conf, metrics, faults, enqueue))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def call(path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=body), timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        assert call("/transcribe", b'{"audio_seconds": 1.5}') == (202, b'{"task_id": "task-1"}')
        assert enqueued == [1.5]
        assert call("/health")[0] == 200
        assert call("/nope/x/y")[0] == 404
        assert call("/admin/error-rate", b"1.0") == (200, b'{"rate": 1.0}')
        assert [call("/health")[0] for _ in range(5)] == [500] * 5
        assert call("/admin/error-rate", b'{"rate": 0}')[0] == 200
        assert call("/admin/error-rate", b"7")[0] == 400
        page = parse_metrics(call("/metrics")[1].decode())
        assert page['http_requests_total{endpoint="/transcribe",method="POST",status="202"}'] == 1
        assert page['http_requests_total{endpoint="/health",method="GET",status="500"}'] == 5
        assert page['http_requests_total{endpoint="other",method="GET",status="404"}'] == 1
        assert page['http_request_duration_seconds_count{endpoint="/health",method="GET"}'] == 6
        assert page["http_requests_in_progress"] == 0
        assert not [k for k in page if "/metrics" in k or "/admin" in k], "metrics/admin calls are not counted"
    finally:
        server.shutdown()
        server.server_close()
    disabled = api.make_handler(settings.load({}), api.ApiMetrics(), api.FaultInjector(0.0), enqueue)
    server = ThreadingHTTPServer(("127.0.0.1", 0), disabled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert call("/admin/error-rate", b"1.0")[0] == 404  # off unless PIPELINE_ADMIN=1
    finally:
        server.shutdown()
        server.server_close()
