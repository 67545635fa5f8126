"""Sample exporters for `--demo`: the five endpoints of the pipeline, with a simulated workload.

Each is a real prometheus-client registry served over HTTP on 127.0.0.1:<ephemeral>; a simulator thread
moves the numbers (requests, latency, queue depth, workers) so graphs and alerts have something to show.
The API's metrics have exactly the names and labels of the seed's table.
"""
from __future__ import annotations

import random
import threading
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SIMULATION_STEP = 0.5  # seconds between simulated events


class SampleExporter:
    """One registry on its own HTTP port."""

    def __init__(self, name: str, remote_port: int) -> None:
        self.name = name
        self.remote_port = remote_port  # the port it stands for on a production host
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        self._server, self._thread = start_http_server(0, "127.0.0.1", registry=self.registry)
        return self.port

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)


class DemoPipeline:
    """The five sample exporters and the simulator that drives them."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.exporters = {n: SampleExporter(n, p) for n, p in
                          (("api", 8000), ("flower", 5555), ("postgres", 9187), ("redis", 9121), ("windows", 9182))}
        self._steps: list[Callable[[], None]] = [self._api(), self._flower(), self._postgres(), self._redis(),
                                                 self._windows()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._simulate, name="demo-simulator", daemon=True)

    def start(self) -> dict[int, int]:
        """Start every exporter; return {production port: actual local port}."""
        ports = {e.remote_port: e.start() for e in self.exporters.values()}
        self._step()  # the first scrape already sees traffic
        self._thread.start()
        return ports

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for exporter in self.exporters.values():
            exporter.close()

    def _simulate(self) -> None:
        while not self._stop.wait(SIMULATION_STEP):
            self._step()

    def _step(self) -> None:
        for step in self._steps:
            step()

    # -- one function per exporter: declare its metrics, return the step that moves them ----------
    def _api(self) -> Callable[[], None]:
        registry = self.exporters["api"].registry
        requests = Counter("http_requests_total", "Total HTTP requests.", ["method", "endpoint", "status"],
                           registry=registry)
        duration = Histogram("http_request_duration_seconds", "Request latency.", ["method", "endpoint"],
                             registry=registry)
        in_progress = Gauge("http_requests_in_progress", "Requests being served.", registry=registry)
        endpoints = (("POST", "/transcribe", 0.25), ("GET", "/status", 0.02), ("GET", "/health", 0.005))
        rng = self._rng

        def step() -> None:
            for method, endpoint, typical in endpoints:
                for _ in range(rng.randint(1, 6)):
                    status = "500" if rng.random() < 0.01 else ("202" if method == "POST" else "200")
                    requests.labels(method, endpoint, status).inc()
                    duration.labels(method, endpoint).observe(rng.expovariate(1 / typical))
            in_progress.set(rng.randint(0, 4))

        return step

    def _flower(self) -> Callable[[], None]:
        registry = self.exporters["flower"].registry
        events = Counter("flower_events", "Celery events.", ["worker", "type", "task"], registry=registry)
        online = Gauge("flower_worker_online", "Worker online status.", ["worker"], registry=registry)
        for worker in ("celery@worker-1", "celery@worker-2"):
            online.labels(worker).set(1)
        rng = self._rng

        def step() -> None:
            worker = rng.choice(("celery@worker-1", "celery@worker-2"))
            n = rng.randint(0, 3)
            events.labels(worker, "task-received", "transcribe").inc(n)
            events.labels(worker, "task-succeeded", "transcribe").inc(max(0, n - (rng.random() < 0.05)))
            if rng.random() < 0.05:
                events.labels(worker, "task-failed", "transcribe").inc()

        return step

    def _postgres(self) -> Callable[[], None]:
        registry = self.exporters["postgres"].registry
        up = Gauge("pg_up", "Whether the last scrape of PostgreSQL worked.", registry=registry)
        activity = Gauge("pg_stat_activity_count", "Connections by state.", ["datname", "state"], registry=registry)
        size = Gauge("pg_database_size_bytes", "Database size.", ["datname"], registry=registry)
        up.set(1)
        rng = self._rng

        def step() -> None:
            activity.labels("pipeline", "active").set(rng.randint(1, 8))
            activity.labels("pipeline", "idle").set(rng.randint(2, 10))
            size.labels("pipeline").inc(rng.randint(0, 4096))

        size.labels("pipeline").set(48_000_000)
        return step

    def _redis(self) -> Callable[[], None]:
        registry = self.exporters["redis"].registry
        up = Gauge("redis_up", "Whether Redis answers.", registry=registry)
        key_size = Gauge("redis_key_size", "Length of a checked key.", ["db", "key"], registry=registry)
        memory = Gauge("redis_memory_used_bytes", "Memory used by Redis.", registry=registry)
        clients = Gauge("redis_connected_clients", "Connected clients.", registry=registry)
        up.set(1)
        depth = [5]
        rng = self._rng

        def step() -> None:
            depth[0] = max(0, depth[0] + rng.randint(-3, 3))
            key_size.labels("db0", "celery").set(depth[0])
            memory.set(2_000_000 + depth[0] * 1500 + rng.randint(0, 50_000))
            clients.set(rng.randint(4, 9))

        return step

    def _windows(self) -> Callable[[], None]:
        registry = self.exporters["windows"].registry
        cpu = Counter("windows_cpu_time", "CPU time by mode.", ["core", "mode"], registry=registry)
        free = Gauge("windows_os_physical_memory_free_bytes", "Free physical memory.", registry=registry)
        rng = self._rng

        def step() -> None:
            for core in ("0,0", "0,1"):
                cpu.labels(core, "user").inc(SIMULATION_STEP * rng.uniform(0.1, 0.6))
                cpu.labels(core, "idle").inc(SIMULATION_STEP * rng.uniform(0.3, 0.9))
            free.set(8_000_000_000 + rng.randint(-200_000_000, 200_000_000))

        return step
