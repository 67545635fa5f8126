"""The agent's own /metrics: tunnel and forward health, read from live state at scrape time.

A custom collector (as celery-exporter and client_python's process collector do) turns the plain
counters of HostStats/ForwardStats into metric families on each scrape, so the data path never pays
for a metric update. Served by prometheus-client on 127.0.0.1 only, by default.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .errors import UsageError
from .supervisor import HostTunnel

log = logging.getLogger(__name__)

CONNECT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TunnelCollector:
    """Yields tunnel_* families from the current set of HostTunnels (the set changes on reload)."""

    def __init__(self, tunnels: Callable[[], Iterable[HostTunnel]]) -> None:
        self._tunnels = tunnels

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("tunnel_up", "1 if the SSH connection to the host is established.", labels=["host"])
        state = GaugeMetricFamily("tunnel_state", "Supervisor state of the host (1 for the current one).",
                                  labels=["host", "state"])
        reconnects = CounterMetricFamily("tunnel_reconnects", "Successful reconnects after a drop.", labels=["host"])
        failures = CounterMetricFamily("tunnel_connect_failures", "Failed connection attempts.", labels=["host"])
        rtt = GaugeMetricFamily("tunnel_ssh_rtt_seconds", "Round trip of the last SSH keepalive.", labels=["host"])
        last_error = GaugeMetricFamily("tunnel_last_error_info",
                                       "The last connection error of the host (value: its Unix time).",
                                       labels=["host", "reason"])
        fwd_up = GaugeMetricFamily("tunnel_forward_up",
                                   "1 if a channel to the forward's remote port opens and the exporter answers.",
                                   labels=["host", "forward"])
        listening = GaugeMetricFamily("tunnel_forward_listening", "1 if the local listener is bound.",
                                      labels=["host", "forward", "local"])
        conns = GaugeMetricFamily("tunnel_forward_connections", "Open connections through the forward.",
                                  labels=["host", "forward"])
        refused = CounterMetricFamily("tunnel_forward_failures", "Connections that could not get a channel.",
                                      labels=["host", "forward"])
        fwd_error = GaugeMetricFamily("tunnel_forward_last_error_info",
                                      "The forward's last channel error (value: its Unix time).",
                                      labels=["host", "forward", "reason"])
        nbytes = CounterMetricFamily("tunnel_forward_bytes", "Bytes carried by the forward.",
                                     labels=["host", "forward", "direction"])
        for tunnel in self._tunnels():
            host, stats = tunnel.host.name, tunnel.stats
            up.add_metric([host], 1.0 if stats.state == "up" else 0.0)
            for name in ("connecting", "up", "backoff"):
                state.add_metric([host, name], 1.0 if stats.state == name else 0.0)
            reconnects.add_metric([host], stats.reconnects_total)
            failures.add_metric([host], stats.failures_total)
            if stats.rtt is not None:
                rtt.add_metric([host], stats.rtt)
            if stats.last_error_reason:
                last_error.add_metric([host, stats.last_error_reason], stats.last_error_at)
            for name, f in tunnel.forwards.items():
                fwd_up.add_metric([host, name], 1.0 if (f.probe_ok and stats.state == "up") else 0.0)
                listening.add_metric([host, name, f.forward.local], 1.0 if f.listening else 0.0)
                conns.add_metric([host, name], f.active)
                refused.add_metric([host, name], f.failed_total)
                if f.last_error_reason:
                    fwd_error.add_metric([host, name, f.last_error_reason], f.last_error_at)
                nbytes.add_metric([host, name, "to_remote"], f.bytes_to_remote)
                nbytes.add_metric([host, name, "from_remote"], f.bytes_from_remote)
        accepted_total = CounterMetricFamily("tunnel_forward_connections_accepted",
                                             "Connections accepted by the forward.", labels=["host", "forward"])
        for tunnel in self._tunnels():
            for name, f in tunnel.forwards.items():
                accepted_total.add_metric([tunnel.host.name, name], f.accepted_total)
        yield from (up, state, reconnects, failures, rtt, last_error, fwd_up, listening, conns,
                    accepted_total, refused, fwd_error, nbytes)
        info = InfoMetricFamily("tunnel_agent", "Version of the tunnel agent.")
        info.add_metric([], {"version": __version__})
        yield info


class CollectorSet:
    """Per-host collectors (e.g. Celery workers) that come and go with reloads, as one collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Collector] = {}

    def add(self, key: str, collector: "Collector") -> None:
        with self._lock:
            self._items[key] = collector

    def remove(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def get(self, key: str) -> "Collector | None":
        with self._lock:
            return self._items.get(key)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            items = list(self._items.values())
        families: dict[str, Metric] = {}
        for collector in items:  # merge same-named families of several hosts into one
            for family in collector.collect():
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name].samples.extend(family.samples)
        return list(families.values())


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class AgentMetrics:
    """The registry and the HTTP server of the agent's own metrics."""

    def __init__(self, tunnels: Callable[[], Iterable[HostTunnel]], extra: Collector | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TunnelCollector(tunnels))
        if extra is not None:
            self.registry.register(extra)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.connect_duration = Histogram("tunnel_connect_duration_seconds",
                                          "Time to connect, check the host key and authenticate.",
                                          ["host"], buckets=CONNECT_BUCKETS, registry=self.registry)
        self._tunnels = tunnels
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_connects(self) -> None:
        """Move connect durations recorded by supervisors into the histogram (called before scrapes)."""
        for tunnel in self._tunnels():
            durations = tunnel.stats.connect_durations
            while durations:
                self.connect_duration.labels(tunnel.host.name).observe(durations.pop(0))

    def serve(self, addr: tuple[str, int]) -> str:
        """Listen on addr; return the URL. A busy port is a usage error naming the fix."""
        try:
            self._server, self._thread = start_http_server(addr[1], addr[0], registry=self._ObservingRegistry(self))
        except OSError as exc:
            raise UsageError(f"cannot serve the agent's metrics on {addr[0]}:{addr[1]} ({exc.strerror}): "
                             "pick another with --metrics 127.0.0.1:PORT, or --metrics off") from None
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"http://{host}:{self._server.server_port}/metrics"

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = None

    class _ObservingRegistry:
        """Registry facade that folds pending connect durations in before each collection."""

        def __init__(self, outer: "AgentMetrics") -> None:
            self._outer = outer

        def collect(self) -> Iterable[Metric]:
            self._outer.observe_connects()
            return self._outer.registry.collect()

        def restricted_registry(self, names: Iterable[str]):  # used for ?name[]= queries
            self._outer.observe_connects()
            return self._outer.registry.restricted_registry(names)
