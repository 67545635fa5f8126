"""The running agent: every host's tunnel, the agent's metrics, probes, status, signals.

`Agent.run()` blocks in the main thread until stop() (SIGINT/SIGTERM); nothing slow ever runs on the
main thread, so one unreachable host never delays another.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Iterable

from .auth import Identities, load_identities
from .config import AgentConfig, HostConfig
from .forward import Acceptor
from .metrics import AgentMetrics
from .status import StatusDisplay
from .supervisor import HostTunnel

log = logging.getLogger(__name__)


def identities_for(host: HostConfig) -> Identities:
    return load_identities(host.identity_files, host.identities_only)


class Agent:
    """Owns the tunnels of every configured host and the agent's own endpoints."""

    def __init__(self, config: AgentConfig, *, show_status: bool = True, status_stream=None,
                 identities: Callable[[HostConfig], Identities] = identities_for) -> None:
        self.config = config
        self._identities = identities
        self.acceptor: Acceptor | None = None
        self.tunnels: dict[str, HostTunnel] = {}
        self.metrics = AgentMetrics(self.current_tunnels)
        self.metrics_url: str | None = None
        self.status = StatusDisplay(self.current_tunnels, stream=status_stream) if show_status else None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def current_tunnels(self) -> Iterable[HostTunnel]:
        with self._lock:
            return list(self.tunnels.values())

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Check keys, bind every listener, start supervisors; raise UsageError before anything runs."""
        prepared = [self._prepare(host) for host in self.config.hosts]  # key/port errors first
        self.acceptor = Acceptor()
        bound: list[HostTunnel] = []
        try:
            for tunnel in prepared:
                tunnel.acceptor = self.acceptor
                tunnel.bind()
                bound.append(tunnel)
            if self.config.metrics_addr is not None:
                self.metrics_url = self.metrics.serve(self.config.metrics_addr)
        except BaseException:
            for tunnel in bound:
                tunnel.stop()
            self.acceptor.close()
            raise
        with self._lock:
            self.tunnels = {t.host.name: t for t in prepared}
        if self.status is not None:
            self.status.start()
        for tunnel in prepared:
            tunnel.start()

    def _prepare(self, host: HostConfig) -> HostTunnel:
        identities = self._identities(host)
        jump_ids = self._identities(host.jump) if host.jump is not None else None
        observer = self.status.changed if self.status is not None else (lambda tunnel: None)
        return HostTunnel(host, identities, self.acceptor, connect_wait=self.config.connect_wait,  # type: ignore[arg-type]
                          jump_identities=jump_ids, on_change=observer)

    def run(self, install_signals: bool = True) -> int:
        """Start, then block until stop(); return the exit status (0 on a clean stop)."""
        if install_signals:
            self._install_signal_handlers()
        self.start()
        try:
            while not self._stop.wait(3600):
                pass
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Close listeners, sessions and servers; join every thread the agent started."""
        for tunnel in self.current_tunnels():
            tunnel.stop()
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        self.metrics.close()
        if self.status is not None:
            self.status.stop()

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
