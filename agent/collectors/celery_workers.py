"""Celery worker liveness from Flower's workers API, read through the tunnel.

Flower's own `flower_worker_online` flips to 0 only on a `worker-offline` event, which a crashed
(kill -9, OOM-killed, power-lost) worker never sends, so it stays 1 for ever (Flower issues 1128 and
1221). Flower's `/api/workers?status=true` instead answers `Worker.alive` from celery.events.state:
True while the worker's last heartbeat is younger than `freq * 2` (heartbeats every 2 s by default, so
about 4 s). This collector polls that endpoint and exports:

  celery_worker_up{host,worker}   1 if Flower has a recent heartbeat of the worker, else 0
  celery_workers_online{host}     how many workers are up (0 when every known worker is dead)
  celery_flower_up{host}          1 if the last poll of Flower's API succeeded

When Flower cannot be read (forward down, Flower down, HTTP error, bad credentials, nonsense JSON) or
the last good answer is older than `stale_after`, only `celery_flower_up{host} 0` is exported: no
worker series at all, so no stale `celery_worker_up 1` and no false `celery_workers_online 0`; the
alert rules see the absence (and ForwardDown/ExporterScrapeFailing say why). A worker Flower has
seen stays listed with 0 after it dies, until Flower restarts (Flower keeps dead workers in memory).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

import requests
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

WORKERS_PATH = "/api/workers?status=true"


class CeleryWorkersCollector:
    """Polls Flower's `/api/workers?status=true` for one host; exports the last answer on collect()."""

    def __init__(self, host: str, base_url: str, auth: tuple[str, str] | None = None, *, timeout: float = 5.0,
                 stale_after: float = 90.0, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.url = base_url.rstrip("/") + WORKERS_PATH
        self.auth = auth
        self.timeout = timeout
        self.stale_after = stale_after
        self._clock = clock
        self._session = session or requests.Session()
        self._session.trust_env = False  # never send 127.0.0.1 through an HTTP(S)_PROXY
        self._lock = threading.Lock()
        self._polling = threading.Lock()
        self._workers: dict[str, bool] | None = None
        self._polled_at: float | None = None
        self.last_error = ""

    def poll(self) -> None:
        """Read Flower once (bounded by `timeout`); a poll already running makes this one a no-op."""
        if not self._polling.acquire(blocking=False):
            return
        try:
            workers, error = self._read()
            with self._lock:
                if workers is None:
                    if error != self.last_error:
                        log.warning("%s: Celery workers unknown: %s", self.host, error)
                    self._workers, self._polled_at = None, None
                else:
                    if self.last_error:
                        log.info("%s: Flower's workers API answers again", self.host)
                    self._workers, self._polled_at = workers, self._clock()
                self.last_error = error
        finally:
            self._polling.release()

    def _read(self) -> tuple[dict[str, bool] | None, str]:
        try:
            response = self._session.get(self.url, auth=self.auth, timeout=self.timeout,
                                         headers={"Connection": "close", "Accept": "application/json"})
        except requests.RequestException as exc:
            return None, f"Flower not reachable at {self.url}: {type(exc).__name__}"
        if response.status_code in (401, 403):
            return None, f"Flower answered HTTP {response.status_code}: set flower_auth for this host"
        if response.status_code != 200:
            return None, f"Flower answered HTTP {response.status_code}"
        try:
            data = response.json()
        except ValueError:
            return None, "Flower's workers API did not answer JSON"
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, bool)
                                                 for k, v in data.items()):
            return None, "Flower's workers API answered an unexpected shape (not {worker: bool})"
        return data, ""

    def snapshot(self) -> dict[str, bool] | None:
        """The workers of the last good poll (worker -> alive), or None when unknown or stale."""
        with self._lock:
            if self._workers is None or self._polled_at is None:
                return None
            if self._clock() - self._polled_at > self.stale_after:
                return None
            return dict(self._workers)

    def collect(self) -> Iterable[Metric]:
        workers = self.snapshot()
        flower_up = GaugeMetricFamily("celery_flower_up",
                                      "1 if the last read of Flower's workers API through the tunnel succeeded.",
                                      labels=["host"])
        flower_up.add_metric([self.host], 0.0 if workers is None else 1.0)
        yield flower_up
        if workers is None:
            return
        up = GaugeMetricFamily("celery_worker_up",
                               "1 if the worker's heartbeat is recent (Flower's /api/workers?status=true).",
                               labels=["host", "worker"])
        for name, alive in sorted(workers.items()):
            up.add_metric([self.host, name], 1.0 if alive else 0.0)
        online = GaugeMetricFamily("celery_workers_online", "Number of workers with celery_worker_up == 1.",
                                   labels=["host"])
        online.add_metric([self.host], float(sum(workers.values())))
        yield up
        yield online
