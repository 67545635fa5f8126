"""A "remote host" for tests: a network namespace whose 127.0.0.1 is not ours, reached only through sshd.

The namespace gets a veth link to the test's (root) namespace, its own loopback, a real OpenSSH sshd
listening on the veth address, and whatever servers a test starts on its 127.0.0.1 — exactly the shape
of a production host whose exporters listen on loopback only. Everything it creates (namespace, veth,
processes, files) is removed by close(), and stale namespaces of dead test runs are swept on start.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

PREFIX = "tnlt"  # namespaces are named tnlt<pid>x<n>: the pid tells whether their test run is gone
HELPERS = Path(__file__).resolve().parent / "helpers"
SSHD = "/usr/sbin/sshd"
_counter = itertools.count(1)


def require(binaries: Sequence[str]) -> None:
    """Skip (or, with CI=true, fail) when not root or a binary is missing."""
    import pytest

    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (ip netns)")
    for binary in binaries:
        if not (shutil.which(binary) or Path(binary).exists()):
            problems.append(f"needs {binary}")
    if problems:
        message = "; ".join(problems) + " - run the README's test command (it apt-installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def sweep_stale_namespaces() -> None:
    """Delete namespaces left by test runs whose process no longer exists."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "x" not in name[len(PREFIX):]:
            continue
        pid = name[len(PREFIX):].split("x", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _run(["ip", "netns", "del", name], check=False)


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "", comment: str = "test") -> Path:
    """Generate an OpenSSH key pair at `path` (and path.pub)."""
    _run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", comment, "-f", str(path)])
    return path


class RemoteHost:
    """A namespace host with sshd on <addr>:22 and servers on its own 127.0.0.1."""

    def __init__(self, workdir: Path | None = None, client_key: Path | None = None) -> None:
        sweep_stale_namespaces()
        n = next(_counter)
        self.ns = f"{PREFIX}{os.getpid()}x{n}"
        self._veth = f"tv{os.getpid() % 100000}x{n}"[:15]
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="remote-host-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.sshd: subprocess.Popen | None = None
        self.sshd_port = 22
        self._blackholed = False
        with _subnet_lock():  # concurrent test runs must not pick the same /30
            self.index = _free_subnet_index((os.getpid() % 200) * 50 + n)
            base = f"10.{200 + (self.index // 250) % 50}.{self.index % 250}"
            self.addr, self.gateway = f"{base}.2", f"{base}.1"
            self._create_namespace()
        try:
            self.host_key = keygen(self.workdir / "ssh_host_ed25519_key")
            self.client_key = client_key or keygen(self.workdir / "id_ed25519")
            self.authorized_keys = self.workdir / "authorized_keys"
            self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        except BaseException:
            self.close()
            raise
        self.sshd_extra: list[str] = []

    # -- namespace ------------------------------------------------------------------------------
    def _create_namespace(self) -> None:
        _run(["ip", "netns", "add", self.ns])
        try:
            peer = self._veth + "p" if len(self._veth) < 15 else self._veth[:-1] + "p"
            _run(["ip", "link", "add", self._veth, "type", "veth", "peer", "name", peer])
            _run(["ip", "link", "set", peer, "netns", self.ns])
            _run(["ip", "addr", "add", f"{self.gateway}/30", "dev", self._veth])
            _run(["ip", "link", "set", self._veth, "up"])
            self.exec(["ip", "addr", "add", f"{self.addr}/30", "dev", peer])
            self.exec(["ip", "link", "set", peer, "up"])
            self.exec(["ip", "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise

    def exec(self, cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait for it."""
        return _run(["ip", "netns", "exec", self.ns, *cmd], check=check)

    def spawn(self, cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start a long-running process inside the namespace; close() stops it."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **popen)
        self.processes.append(proc)
        return proc

    # -- sshd ------------------------------------------------------------------------------------
    def sshd_config_text(self) -> str:
        lines = [
            f"ListenAddress {self.addr}:{self.sshd_port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "LogLevel VERBOSE",
            "MaxStartups 200",
            "MaxSessions 200",
            *self.sshd_extra,
        ]
        return "\n".join(lines) + "\n"

    def start_sshd(self, timeout: float = 10.0) -> None:
        """Start (or start again) sshd in the namespace and wait until it answers with its banner."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.workdir / "sshd_config"
        config.write_text(self.sshd_config_text())
        _run([SSHD, "-t", "-f", str(config)])
        log = open(self.workdir / "sshd.log", "ab")
        self.sshd = self.spawn([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
        log.close()
        wait_until(self._sshd_answers, timeout, f"sshd on {self.addr}:{self.sshd_port}")

    def _sshd_answers(self) -> bool:
        try:
            with socket.create_connection((self.addr, self.sshd_port), timeout=0.5) as sock:
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def stop_sshd(self) -> None:
        """Stop the listening sshd, then every session it forked (like `systemctl stop ssh` + kill).

        The listener goes first: killing sessions first lets a client that reconnects at once get a new
        session from the old listener. Sessions are then found as the sshd processes of the namespace.
        """
        if self.sshd is not None:
            _stop(self.sshd)
            self.processes.remove(self.sshd)
            self.sshd = None
        for pid in self.namespace_sshd_pids():
            _kill(pid, signal.SIGKILL)

    def namespace_sshd_pids(self) -> list[int]:
        """Every sshd process (listener or session) running in this namespace."""
        listing = _run(["ip", "netns", "pids", self.ns], check=False).stdout.split()
        pids = []
        for pid in (int(p) for p in listing if p.isdigit()):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("sshd"):
                pids.append(pid)
        return pids

    def restart_sshd(self) -> None:
        self.stop_sshd()
        self.start_sshd()

    def sshd_session_pids(self) -> list[int]:
        """PIDs of per-connection sshd processes forked by our listening sshd (and their children)."""
        if self.sshd is None:
            return []
        listener = _child_pids(self.sshd.pid) or [self.sshd.pid]  # ip netns exec execs sshd in place
        roots = listener if self.sshd.pid in listener else [self.sshd.pid]
        found: list[int] = []
        frontier = list(roots)
        while frontier:
            children = [c for p in frontier for c in _child_pids(p)]
            found.extend(children)
            frontier = children
        return found

    def kill_sessions(self, sig: int = signal.SIGKILL) -> list[int]:
        pids = self.sshd_session_pids()
        for pid in pids:
            _kill(pid, sig)
        return pids

    def blackhole(self) -> None:
        """Drop every packet of the SSH port in the namespace: no RST, no FIN, just silence."""
        for chain, flag in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
            self.exec(["iptables", "-I", chain, "-p", "tcp", flag, str(self.sshd_port), "-j", "DROP"])
        self._blackholed = True

    def clear_blackhole(self) -> None:
        if self._blackholed:
            for chain, flag in (("INPUT", "--dport"), ("OUTPUT", "--sport")):
                self.exec(["iptables", "-D", chain, "-p", "tcp", flag, str(self.sshd_port), "-j", "DROP"],
                          check=False)
            self._blackholed = False

    # -- servers on the namespace's own 127.0.0.1 --------------------------------------------------
    def serve_metrics(self, port: int, size: int = 4096, name: str = "exporter") -> subprocess.Popen:
        """An HTTP server on the namespace's 127.0.0.1:port serving /metrics of about `size` bytes."""
        proc = self.spawn(
            [sys.executable, str(HELPERS / "metrics_http.py"), "--port", str(port), "--size", str(size),
             "--name", name],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"metrics server on port {port} did not start: {line!r}")
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        _stop(proc)
        if proc in self.processes:
            self.processes.remove(proc)

    def known_hosts_line(self) -> str:
        """The known_hosts line a client needs for this host (OpenSSH's format, [host]:port if not 22)."""
        pub = Path(f"{self.host_key}.pub").read_text().split()
        host = self.addr if self.sshd_port == 22 else f"[{self.addr}]:{self.sshd_port}"
        return f"{host} {pub[0]} {pub[1]}\n"

    def close(self) -> None:
        self.clear_blackhole()
        for proc in reversed(self.processes):
            _stop(proc)
        self.processes.clear()
        for pid in self.namespace_sshd_pids():  # sessions outlive their listener
            _kill(pid, signal.SIGKILL)
        self.sshd = None
        _run(["ip", "link", "del", self._veth], check=False)
        _run(["ip", "netns", "del", self.ns], check=False)

    def __enter__(self) -> "RemoteHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _subnet_lock() -> Iterator[None]:
    path = Path("/run/lock/ssh-tunnel-agent-tests-subnets.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_subnet_index(start: int) -> int:
    """The first /30 index from `start` whose gateway address no interface of ours holds yet."""
    taken = _run(["ip", "-o", "-4", "addr"], check=False).stdout
    index = start
    for _ in range(2500):
        base = f"10.{200 + (index // 250) % 50}.{index % 250}"
        if f" {base}.1/" not in taken:
            return index
        index += 1
    raise RuntimeError("no free 10.200-249.x.0/30 subnet for a namespace host")


def _child_pids(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            children.extend(int(c) for c in text.split())
    except OSError:
        pass
    return children


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream:
            stream.close()
