"""The running agent: every host's tunnel, the agent's metrics, probes, file_sd, status, signals.

`Agent.run()` blocks in the main thread until SIGINT/SIGTERM; nothing slow ever runs on the main thread,
so one unreachable host never delays another. SIGHUP reloads the config: only added, removed or changed
hosts are touched; the others keep their SSH connections and open client connections.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Iterable, TextIO

from . import __version__
from .auth import Identities, load_identities
from .collectors.celery_workers import POLL_INTERVAL, CeleryWorkersCollector
from .config import AgentConfig, HostConfig
from .discovery import write_file_sd
from .errors import AgentError
from .forward import Acceptor
from .metrics import AgentMetrics, CollectorSet
from .probe import PROBE_ORIGIN, Prober, probe_url
from .status import StatusDisplay
from .supervisor import HostTunnel

log = logging.getLogger(__name__)

IdentityLoader = Callable[[HostConfig], Identities]
ConfigLoader = Callable[[AgentConfig], AgentConfig]


def identities_for(host: HostConfig) -> Identities:
    """The keys to offer to a host: ssh-agent keys, then its identity files."""
    return load_identities(host.identity_files, host.identities_only)


class Agent:
    """Owns the tunnels of every configured host and the agent's own endpoints."""

    def __init__(self, config: AgentConfig, *, show_status: bool = True, status_stream: TextIO | None = None,
                 identities: IdentityLoader = identities_for, reload_config: ConfigLoader | None = None) -> None:
        self.config = config
        self._identities = identities
        self._reload_config = reload_config
        self.acceptor: Acceptor | None = None
        self.tunnels: dict[str, HostTunnel] = {}
        self.collectors = CollectorSet()
        self.metrics = AgentMetrics(self.current_tunnels, extra=self.collectors)
        self.metrics_url: str | None = None
        self.status = StatusDisplay(self.current_tunnels, stream=status_stream) if show_status else None
        self.prober = Prober(self.current_tunnels, config.probe_interval)
        self.on_started: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._polls: dict[str, Any] = {}  # host -> its Celery workers collector

    def current_tunnels(self) -> Iterable[HostTunnel]:
        with self._lock:
            return list(self.tunnels.values())

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Check keys, bind every listener, start supervisors; raise UsageError before anything runs."""
        prepared = [self._prepare(host) for host in self.config.hosts]  # key errors before any bind
        self.acceptor = Acceptor()
        bound: list[HostTunnel] = []
        try:
            for tunnel in prepared:
                tunnel.acceptor = self.acceptor
                tunnel.bind()
                bound.append(tunnel)
            if self.config.metrics_addr is not None:
                self.metrics_url = self.metrics.serve(self.config.metrics_addr)
            if self.config.sd_file is not None:
                write_file_sd(self.config.sd_file, self.config)
        except BaseException:
            for tunnel in bound:
                tunnel.stop()
            self.acceptor.close()
            self.acceptor = None
            self.metrics.close()
            raise
        with self._lock:
            self.tunnels = {t.host.name: t for t in prepared}
        for tunnel in prepared:
            self._add_collectors(tunnel.host)
        if self.status is not None:
            self.status.header = self.header()
            self.status.start()
        for tunnel in prepared:
            tunnel.start()
        self.prober.start()
        self.on_started()

    def header(self) -> str:
        """The first line of the live status."""
        forwards = sum(len(h.forwards) for h in self.config.hosts)
        metrics = f"metrics {self.metrics_url}" if self.metrics_url else "metrics off"
        return (f"tunnel {__version__} - {len(self.config.hosts)} host(s), {forwards} forward(s) - {metrics} - "
                "Ctrl-C to stop")

    def _prepare(self, host: HostConfig) -> HostTunnel:
        identities = self._identities(host)
        jump_ids = self._identities(host.jump) if host.jump is not None else None
        return HostTunnel(host, identities, self.acceptor, connect_wait=self.config.connect_wait,  # type: ignore[arg-type]
                          jump_identities=jump_ids, on_change=self._tunnel_changed)

    def _tunnel_changed(self, tunnel: HostTunnel) -> None:
        if self.status is not None:
            self.status.changed(tunnel)
        if tunnel.stats.state == "up":
            self.prober.probe_host(tunnel)  # forward_up reflects a reconnect at once, not 15 s later

    def _add_collectors(self, host: HostConfig) -> None:
        """A Celery workers collector for a host with a `flower` forward (reads Flower through the tunnel)."""
        flower = next((f for f in host.forwards if f.name == "flower"), None)
        if flower is None:
            return

        def open_channel(timeout: float) -> object:
            """A channel to Flower on the host's SSH session (no local connection, accept thread or pump)."""
            with self._lock:
                tunnel = self.tunnels.get(host.name)
            if tunnel is None or tunnel.stats.state != "up":  # never wait for (nor nudge) a reconnect
                raise ConnectionError(f"SSH to {host.name} is down")
            channel = tunnel.open_forward_channel(flower, PROBE_ORIGIN, timeout)
            channel.settimeout(timeout)
            return channel

        def answered(status: int) -> None:  # Flower answered: the flower forward needs no probe this round
            with self._lock:
                tunnel = self.tunnels.get(host.name)
            if tunnel is not None and flower.name in tunnel.forwards:
                self.prober.answered(tunnel.forwards[flower.name], status)

        base_url = probe_url(flower).removesuffix(flower.path)
        collector = CeleryWorkersCollector(host.name, base_url, auth=flower.basic_auth, open_channel=open_channel,
                                           on_answer=answered)
        self.collectors.add(host.name, collector)
        self._polls[host.name] = collector
        self.prober.add_job(collector.poll, POLL_INTERVAL)  # its own faster schedule, not probe_interval

    def _remove_collectors(self, name: str) -> None:
        self.collectors.remove(name)
        collector = self._polls.pop(name, None)
        if collector is not None:
            self.prober.remove_job(collector.poll)
            collector.close()

    def run(self, install_signals: bool = True) -> int:
        """Start, then block until stop(); return the exit status (0 on a clean stop)."""
        if install_signals:
            self._install_signal_handlers()
        self.start()
        try:
            while not self._stop.is_set():
                # with a timeout: a signal the kernel delivers to another thread only sets a flag, and
                # Python runs its handler when the main thread next runs bytecode - a bare wait() never does
                self._wake.wait(0.5)
                self._wake.clear()
                if self._reload_requested.is_set() and not self._stop.is_set():
                    self._reload_requested.clear()
                    self.reload()
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Ask the main loop to reload the config (what SIGHUP does)."""
        self._reload_requested.set()
        self._wake.set()

    def reload(self) -> None:
        """Apply a fresh config: touch only hosts that were added, removed or changed."""
        if self._reload_config is None:
            log.warning("reload requested, but there is no config file to reload (started without --config)")
            return
        try:
            new = self._reload_config(self.config)
        except AgentError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        old_hosts = {h.name: h for h in self.config.hosts}
        new_hosts = {h.name: h for h in new.hosts}
        gone = [n for n in old_hosts if n not in new_hosts or new_hosts[n] != old_hosts[n]]
        added = [n for n in new_hosts if n not in old_hosts or new_hosts[n] != old_hosts[n]]
        for name in gone:
            self._remove_collectors(name)
            with self._lock:
                tunnel = self.tunnels.pop(name, None)
            if tunnel is not None:
                tunnel.stop()
        failed = []
        for name in added:
            assert self.acceptor is not None, "reload before start"
            try:
                tunnel = self._prepare(new_hosts[name])
                tunnel.acceptor = self.acceptor
                tunnel.bind()
            except AgentError as exc:
                log.error("reload: host %s not started: %s", name, exc)
                failed.append(name)
                continue
            with self._lock:
                self.tunnels[name] = tunnel
            self._add_collectors(tunnel.host)
            tunnel.start()
        kept = tuple(h for h in new.hosts if h.name not in failed)
        self.config = AgentConfig(hosts=kept, metrics_addr=self.config.metrics_addr, sd_file=new.sd_file,
                                  sd_target_host=new.sd_target_host, probe_interval=self.config.probe_interval,
                                  connect_wait=new.connect_wait)
        if self.config.sd_file is not None:
            try:
                write_file_sd(self.config.sd_file, self.config)
            except AgentError as exc:
                log.error("reload: %s", exc)
        log.warning("reloaded: %d host(s) kept, %d stopped, %d started", len(new_hosts) - len(added),
                    len(gone), len(added) - len(failed))

    def shutdown(self) -> None:
        """Close listeners, sessions and servers; join every thread the agent started."""
        self.prober.stop()
        for tunnel in self.current_tunnels():
            tunnel.stop()
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        self.metrics.close()
        if self.status is not None:
            self.status.stop()

    def _install_signal_handlers(self) -> None:
        def on_stop(signum: int, _frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda _s, _f: self.request_reload())
