"""Run the real CLI (`python tunnel.py ...`) as a subprocess in tests, and wait on its own metrics.

Readiness is read from the agent's /metrics (tunnel_up, tunnel_forward_up), never from a sleep.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from remote_host import RemoteHost, wait_until

ROOT = Path(__file__).resolve().parent.parent
TUNNEL = ROOT / "tunnel.py"


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that is free right now (tests never use the default ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line of a Prometheus text page."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([^#\s]\S*?(?:\{.*\})?)\s+(\S+)(?:\s+\d+)?$", line)  # an optional timestamp
        if match:
            try:
                samples[match.group(1)] = float(match.group(2))
            except ValueError:
                pass
    return samples


class AgentProcess:
    """`python tunnel.py <args>` with stderr captured to a file; stop() sends SIGTERM and waits."""

    def __init__(self, args: Sequence[str], workdir: Path, metrics_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.metrics_port = metrics_port or free_port()
        self.log_path = workdir / f"agent-{self.metrics_port}.log"
        self._log = open(self.log_path, "wb")
        command = [sys.executable, str(TUNNEL), "--metrics", f"127.0.0.1:{self.metrics_port}", *args]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)

    @classmethod
    def for_host(cls, host: RemoteHost, forwards: Sequence[str], *extra: str, known_hosts: Path | None = None,
                 user: str = "root") -> "AgentProcess":
        """An agent for a RemoteHost: its client key, a known_hosts holding its key, no ~/.ssh/config."""
        if known_hosts is None:
            known_hosts = host.workdir / "known_hosts"
            known_hosts.write_text(host.known_hosts_line())
        args = ["-q", "-F", "none", "-i", str(host.client_key), "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "IdentitiesOnly=yes"]
        for spec in forwards:
            args += ["-L", spec]
        return cls([*args, *extra, f"{user}@{host.addr}"], host.workdir)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metrics(self) -> dict[str, float]:
        try:
            return parse_metrics(fetch(self.metrics_url, timeout=2).decode())
        except OSError:
            return {}

    def value(self, sample: str) -> float | None:
        return self.metrics().get(sample)

    def wait_up(self, timeout: float = 20.0) -> None:
        """Until some tunnel_up sample reads 1."""
        def up() -> bool:
            self.assert_running()
            return any(k.startswith("tunnel_up{") and v == 1.0 for k, v in self.metrics().items())
        wait_until(up, timeout, f"agent up (log: {self.output()[-500:]!r})", interval=0.05)

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.output()[-2000:]}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit status (kills and fails if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"agent did not exit within {timeout}s of SIGTERM")
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def wait_fetch(url: str, timeout: float = 10.0) -> bytes:
    """Fetch url, retrying until it answers 200 or the deadline passes."""
    def attempt() -> bytes | None:
        try:
            return fetch(url, timeout=2)
        except OSError:
            return None
    return wait_until(attempt, timeout, f"{url} to answer", interval=0.05)  # type: ignore[return-value]


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
