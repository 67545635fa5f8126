"""`tunnel --check`: a one-shot diagnosis, step by step, with a hint for every failure.

For each host: DNS, TCP connect, SSH banner, host key, authentication; then for each forward: does a
channel to the remote port open, does the exporter answer HTTP, how many samples does it serve. Rows are
printed as each step finishes (so a slow step shows where it hangs). No local port is bound, so it can run
next to a running agent. Exit status 0 only if every step passed.
"""
from __future__ import annotations

import base64
import socket
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import paramiko

from .auth import load_identities
from .config import AgentConfig, Forward, HostConfig
from .connection import SSHSession, connect
from .errors import AgentError, ConnectError
from .forward import _CHANNEL_REASONS as CHANNEL_REASONS

HTTP_TIMEOUT = 10.0
MAX_PAGE = 64 * 1024 * 1024

_HINTS = {
    "dns": "check the name, or set HostName in ~/.ssh/config",
    "refused": "start sshd on the host, or fix the port (-p / Port)",
    "timeout": "a firewall drops the packets: open TCP {port} for this machine, or use a jump host (-J)",
    "unreachable": "check the address and the route to it",
    "handshake": "is it really an SSH server on that port?",
    "host_key_unknown": "verify the key out of band, then add it to known_hosts (see the message)",
    "host_key_changed": "the host's key differs from known_hosts: verify it before anything else",
    "host_key_revoked": "the host presents a revoked key: do not connect",
    "auth_failed": "put this machine's public key in the account's authorized_keys (or pass -i)",
    "no_key": "pass -i KEY, set IdentityFile, or load a key into ssh-agent",
}


@dataclass
class Row:
    host: str
    step: str
    ok: bool
    detail: str
    hint: str = ""


class Report:
    """Collects rows and prints each as it arrives."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.rows: list[Row] = []
        print(f"{'HOST':<16} {'CHECK':<22} {'RESULT':<6} DETAIL", file=out, flush=True)

    def add(self, row: Row) -> bool:
        self.rows.append(row)
        print(f"{row.host:<16} {row.step:<22} {'ok' if row.ok else 'FAIL':<6} {row.detail}", file=self.out, flush=True)
        if row.hint:
            print(f"{'':<16} {'':<22} {'':<6} hint: {row.hint}", file=self.out, flush=True)
        return row.ok

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)


def run_check(config: AgentConfig, out: TextIO | None = None) -> int:
    """Diagnose every host of the config; 0 if all passed, 1 otherwise."""
    report = Report(out or sys.stdout)
    for host in config.hosts:
        check_host(host, report)
    failed = sum(1 for r in report.rows if not r.ok)
    print(f"\n{len(report.rows) - failed} passed, {failed} failed", file=report.out, flush=True)
    return 0 if report.passed else 1


def check_host(host: HostConfig, report: Report) -> None:
    name = host.name
    if host.jump is None and not _network_steps(host, report):
        return
    try:
        identities = load_identities(host.identity_files, host.identities_only)
        jump_ids = load_identities(host.jump.identity_files, host.jump.identities_only) if host.jump else None
    except AgentError as exc:
        report.add(Row(name, "keys", False, str(exc)))
        return
    started = time.monotonic()
    try:
        session = connect(host, identities, jump_identities=jump_ids)
    except ConnectError as exc:
        step = "host key" if exc.reason.startswith("host_key") else \
            "authentication" if exc.reason in ("auth_failed", "no_key") else "ssh connection"
        if step == "authentication":
            report.add(Row(name, "host key", True, "matches known_hosts"))
        report.add(Row(name, step, False, str(exc), _HINTS.get(exc.reason, "").format(port=host.port)))
        return
    via = f" via {host.jump.hostname}" if host.jump else ""
    report.add(Row(name, "host key", True, f"{session.host_key} matches known_hosts{via}"))
    report.add(Row(name, "authentication", True, f"{session.auth_method} in {time.monotonic() - started:.2f}s"))
    try:
        for forward in host.forwards:
            check_forward(session, host, forward, report)
    finally:
        session.close()
        session.join()


def _network_steps(host: HostConfig, report: Report) -> bool:
    name = host.name
    try:
        infos = socket.getaddrinfo(host.hostname, host.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return report.add(Row(name, "dns", False, f"{host.hostname}: {exc.strerror}", _HINTS["dns"]))
    addresses = sorted({str(info[4][0]) for info in infos})
    report.add(Row(name, "dns", True, f"{host.hostname} -> {', '.join(addresses)}"))
    started = time.monotonic()
    try:
        sock = socket.create_connection((host.hostname, host.port), timeout=host.connect_timeout)
    except ConnectionRefusedError:
        return report.add(Row(name, "tcp connect", False, f"{host.hostname}:{host.port} refused", _HINTS["refused"]))
    except (socket.timeout, TimeoutError):
        return report.add(Row(name, "tcp connect", False, f"{host.hostname}:{host.port}: no answer in "
                              f"{host.connect_timeout:g}s", _HINTS["timeout"].format(port=host.port)))
    except OSError as exc:
        return report.add(Row(name, "tcp connect", False, f"{host.hostname}:{host.port}: {exc.strerror}",
                              _HINTS["unreachable"]))
    elapsed_ms = (time.monotonic() - started) * 1000
    report.add(Row(name, "tcp connect", True, f"{host.hostname}:{host.port} in {elapsed_ms:.1f}ms"))
    try:
        with sock:
            sock.settimeout(host.connect_timeout)
            banner = sock.makefile("rb").readline(256).decode(errors="replace").strip()
    except OSError as exc:
        banner = f"(no banner: {exc})"
    if not banner.startswith("SSH-"):
        return report.add(Row(name, "ssh banner", False, banner or "(connection closed)", _HINTS["handshake"]))
    return report.add(Row(name, "ssh banner", True, banner))


def check_forward(session: SSHSession, host: HostConfig, forward: Forward, report: Report) -> bool:
    """Open a channel to the forward's remote port and fetch its metrics page over it."""
    step = f"forward {forward.name}"
    try:
        channel = session.open_channel(forward.remote_host, forward.remote_port, ("127.0.0.1", 0), HTTP_TIMEOUT)
    except paramiko.ChannelException as exc:
        reason = CHANNEL_REASONS.get(exc.code, exc.text)
        hint = (f"allow it on the host: PermitOpen {forward.remote}" if exc.code == 1 else
                f"start the exporter on the host's {forward.remote}, or drop this forward")
        return report.add(Row(host.name, step, False, f"channel to {forward.remote}: {reason}", hint))
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return report.add(Row(host.name, step, False, f"channel to {forward.remote}: {exc}"))
    try:
        status, body = _http_get(channel, forward)
    except (OSError, EOFError, paramiko.SSHException, ValueError) as exc:
        return report.add(Row(host.name, step, False, f"channel opens, but no HTTP answer: {exc}",
                              f"is an HTTP exporter listening on the host's {forward.remote}?"))
    finally:
        channel.close()
    if status in (401, 403):
        return report.add(Row(host.name, step, False, f"HTTP {status} from {forward.remote}{forward.path}",
                              "set the exporter's basic auth in the config (flower_auth)"))
    if status != 200:
        return report.add(Row(host.name, step, False, f"HTTP {status} from {forward.remote}{forward.path}"))
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return report.add(Row(host.name, step, True, f"{forward.remote}{forward.path}: HTTP 200, {len(body)} bytes, "
                          f"{samples} samples"))


def _http_get(channel: paramiko.Channel, forward: Forward) -> tuple[int, bytes]:
    headers = [f"GET {forward.path} HTTP/1.0", f"Host: {forward.remote}", "User-Agent: tunnel-check"]
    if forward.basic_auth:
        token = base64.b64encode(":".join(forward.basic_auth).encode()).decode()
        headers.append(f"Authorization: Basic {token}")
    channel.settimeout(HTTP_TIMEOUT)
    channel.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
    chunks, size = [], 0
    while size < MAX_PAGE:
        data = channel.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {head[:40]!r}")
    return int(status_line[1]), body
