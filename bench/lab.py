"""The benchmarks' shared bench: namespace hosts, the tunnels under test, fetchers, and clean-up.

Everything a benchmark starts (namespaces, sshd, exporters, `ssh -L`, autossh, sshtunnel, the agent,
fetchers) is registered on a `Lab`; `Lab.close()` stops it all by PID and deletes the namespaces, also
on Ctrl-C or SIGTERM (`bench/run` turns SIGTERM into KeyboardInterrupt). The tests' helpers
(tests/remote_host.py, tests/agent_process.py) are reused, not copied.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from agent_process import AgentProcess, free_port, parse_metrics
from remote_host import HELPERS as TEST_HELPERS
from remote_host import RemoteHost, keygen, wait_until

HELPERS = BENCH / "helpers"
SSH = "ssh"
AUTOSSH = "autossh"
#: The seed's autossh command line (its "Tunnel Keeps Disconnecting" section).
SEED_AUTOSSH_OPTIONS = ("-M", "0", "-o", "ServerAliveInterval 30", "-o", "ServerAliveCountMax 3", "-N")

__all__ = [
    "AgentProcess",
    "Fetcher",
    "Lab",
    "RemoteHost",
    "Tunnel",
    "expected_page",
    "free_port",
    "parse_metrics",
    "percentile",
    "proc_cpu_seconds",
    "proc_memory_kb",
    "process_tree",
    "progress",
    "wait_until",
]


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries only results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values)}


def expected_page(size: int, name: str = "exporter") -> bytes:
    """The exact /metrics body tests/helpers/metrics_http.py serves for (size, name)."""
    sys.path.insert(0, str(TEST_HELPERS))
    try:
        from metrics_http import metrics_page
    finally:
        sys.path.remove(str(TEST_HELPERS))
    return metrics_page(size, name)


# -- /proc readers ---------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """pid and all its descendants that exist now."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                frontier.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; PSS shares shared pages among the processes that map them."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


# -- processes -----------------------------------------------------------------------------------------
def _stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            try:
                stream.close()
            except OSError:
                pass


class Tunnel:
    """A local forward under test: a process (ssh, autossh, sshtunnel helper or the agent) and its local port."""

    def __init__(self, label: str, local_port: int, proc: subprocess.Popen, agent: AgentProcess | None = None,
                 log: Path | None = None) -> None:
        self.label, self.local_port, self.proc, self.agent, self.log = label, local_port, proc, agent, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if self.agent is not None:
            return self.agent.output()
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None


class Fetcher:
    """A fetch worker process (bench/helpers/fetcher.py), optionally inside a namespace.

    Timing happens in the worker, the same code for every configuration, so the bench process itself
    (and its GIL) never sits on a measured path.
    """

    def __init__(self, namespace: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        self.proc = subprocess.Popen([*prefix, sys.executable, str(HELPERS / "fetcher.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def request(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fetcher exited ({self.proc.poll()}) on {command}")
        return json.loads(line)

    def get(self, port: int, path: str = "/metrics", keepalive: bool = False, timeout: float = 10.0) -> dict[str, Any]:
        """One HTTP GET of 127.0.0.1:port; returns {seconds, bytes, sha256, status} or {error}."""
        return self.request(op="get", port=port, path=path, keepalive=keepalive, timeout=timeout)

    def bulk(self, port: int, nbytes: int, timeout: float = 120.0) -> dict[str, Any]:
        """Read nbytes from the bulk server behind 127.0.0.1:port; returns {seconds, bytes, sha256}."""
        return self.request(op="bulk", port=port, nbytes=nbytes, timeout=timeout)

    def close(self) -> None:
        _stop_process(self.proc)


class Lab:
    """Owns every namespace and process of a benchmark; close() removes them all (idempotent)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stack = ExitStack()
        for stale in (workdir / "id_ed25519", workdir / "id_ed25519.pub"):  # a reused --workdir
            stale.unlink(missing_ok=True)
        self.client_key = keygen(workdir / "id_ed25519", comment="bench")
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text("")
        self._closed = False

    # -- hosts -----------------------------------------------------------------------------------------
    def host(self, exporters: dict[int, int] | None = None) -> RemoteHost:
        """A namespace host with sshd started and a metrics server (port -> page size) per entry."""
        n = len(list(self.workdir.glob("host*")))
        host = RemoteHost(self.workdir / f"host{n + 1}", client_key=self.client_key)
        self._stack.callback(host.close)
        host.start_sshd()
        with open(self.known_hosts, "a") as known:
            known.write(host.known_hosts_line())
        for port, size in (exporters or {}).items():
            host.serve_metrics(port, size=size)
        return host

    def serve_bulk(self, host: RemoteHost, port: int) -> None:
        """The bulk-transfer server (bench/helpers/bulk_server.py) on the host's 127.0.0.1:port."""
        proc = host.spawn([sys.executable, str(HELPERS / "bulk_server.py"), "--port", str(port)],
                          stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"bulk server on port {port} did not start: {line!r}")

    def fetcher(self, host: RemoteHost | None = None) -> Fetcher:
        fetcher = Fetcher(host.ns if host is not None else None)
        self._stack.callback(fetcher.close)
        return fetcher

    def process(self, command: Sequence[str], log_name: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / log_name
        with open(log, "wb") as out:
            proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 - only prctl, no locks
        self._stack.callback(_stop_process, proc)
        return proc, log

    # -- the tunnels under test ------------------------------------------------------------------------
    def ssh_options(self) -> list[str]:
        return ["-F", "none", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]

    def ssh_forward(self, host: RemoteHost, remote_port: int, label: str = "ssh -L") -> Tunnel:
        """OpenSSH `ssh -N -L` with its defaults (cipher, no keepalive)."""
        port = free_port()
        proc, log = self.process([SSH, "-N", *self.ssh_options(), "-o", "ExitOnForwardFailure=yes",
                                  "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"root@{host.addr}"],
                                 f"ssh-{port}.log")
        return Tunnel(label, port, proc, log=log)

    def autossh_forward(self, host: RemoteHost, remote_port: int, env: dict[str, str] | None = None,
                        label: str = "autossh (seed)") -> Tunnel:
        """The seed's `autossh -M 0 -o "ServerAliveInterval 30" -o "ServerAliveCountMax 3" -N -L ...`."""
        port = free_port()
        proc, log = self.process([AUTOSSH, *SEED_AUTOSSH_OPTIONS, *self.ssh_options(),
                                  "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"root@{host.addr}"],
                                 f"autossh-{port}.log", env={"AUTOSSH_LOGFILE": str(self.workdir / f"autossh-{port}.alog"),
                                                             **(env or {})})
        return Tunnel(label, port, proc, log=log)

    def sshtunnel_forward(self, host: RemoteHost, remote_port: int, label: str = "sshtunnel") -> Tunnel:
        """sshtunnel's SSHTunnelForwarder with its defaults, in its own process (bench/helpers/sshtunnel_forward.py)."""
        port = free_port()
        proc, log = self.process([sys.executable, str(HELPERS / "sshtunnel_forward.py"), host.addr,
                                  str(self.client_key), str(port), str(remote_port)], f"sshtunnel-{port}.log")
        return Tunnel(label, port, proc, log=log)

    def agent_forward(self, host: RemoteHost, remote_port: int, *extra: str, label: str = "agent") -> Tunnel:
        """This agent through its real CLI (`python tunnel.py -L ...`)."""
        port = free_port()
        agent = AgentProcess.for_host(host, [f"{port}:127.0.0.1:{remote_port}"], *extra, known_hosts=self.known_hosts)
        self._stack.callback(_close_agent, agent)
        return Tunnel(label, port, agent.proc, agent=agent)

    def agent(self, args: Sequence[str]) -> AgentProcess:
        agent = AgentProcess(args, self.workdir)
        self._stack.callback(_close_agent, agent)
        return agent

    def wait_forward(self, tunnel: Tunnel, fetcher: Fetcher, timeout: float = 20.0, bulk: bool = False) -> None:
        """Until a GET (or a 1-byte bulk read) through the tunnel answers; fail with its log if it exited."""
        def answers() -> bool:
            if not tunnel.alive():
                raise RuntimeError(f"{tunnel.label} exited with {tunnel.proc.returncode}: {tunnel.output()[-800:]}")
            answer = fetcher.bulk(tunnel.local_port, 1, timeout=2) if bulk else fetcher.get(tunnel.local_port, timeout=2)
            return "error" not in answer and answer.get("bytes", 0) > 0
        wait_until(answers, timeout, f"{tunnel.label} forward on 127.0.0.1:{tunnel.local_port}", interval=0.05)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stack.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the bench process dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _close_agent(agent: AgentProcess) -> None:
    if agent.proc.poll() is None:
        try:
            agent.stop(timeout=10)
        except AssertionError:
            pass
    agent.__exit__()


def run_timed(label: str, fn: Callable[[], Any]) -> Any:
    started = time.monotonic()
    progress(f"{label}...")
    result = fn()
    progress(f"{label} done in {time.monotonic() - started:.1f}s")
    return result
