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

The agent polls every POLL_INTERVAL seconds (5 s, on its own schedule, not the probe interval): Flower
flags a kill -9'd worker ~4 s after its last heartbeat, so celery_worker_up reads 0 within ~10 s. Each
host's collector keeps ONE keep-alive HTTP/1.1 connection to Flower (`http.client`, no `requests`): in
the agent it is a direct-tcpip channel on the host's SSH session (`open_channel`), so a poll is one
request on an open channel - no local connection, accept thread or pump; without `open_channel` it is a
TCP connection to `base_url`. A connection Flower closed while idle is replaced once, at once. A poll
still running makes the next one a no-op (never two at once, never a queue).
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

WORKERS_PATH = "/api/workers?status=true"
POLL_INTERVAL = 5.0  # seconds between two reads of Flower (the agent's default)
MAX_ANSWER = 4 * 1024 * 1024  # a bigger answer is not a workers list

#: opens a fresh byte stream to Flower (a socket, or a paramiko Channel) with the given timeout
ChannelOpener = Callable[[float], Any]


class CeleryWorkersCollector:
    """Polls Flower's `/api/workers?status=true` for one host; exports the last answer on collect()."""

    def __init__(self, host: str, base_url: str, auth: tuple[str, str] | None = None, *, timeout: float = 5.0,
                 stale_after: float = 90.0, open_channel: ChannelOpener | None = None,
                 on_answer: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.url = base_url.rstrip("/") + WORKERS_PATH
        self.auth = auth
        self.timeout = timeout
        self.stale_after = stale_after
        self._clock = clock
        parsed = urllib.parse.urlsplit(self.url)
        self._address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        self._headers = {"Accept": "application/json", "User-Agent": "tunnel-agent-celery-collector"}
        if auth is not None:
            self._headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        self._open_channel = open_channel
        self._on_answer = on_answer  # told Flower's HTTP status after each answer (proof the forward works)
        self._conn: http.client.HTTPConnection | None = None
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
            status, body = self._get()
        except Exception as exc:  # noqa: BLE001 - OSError, HTTPException, paramiko's SSHException, EOFError...
            return None, f"Flower not reachable at {self.url}: {type(exc).__name__}"
        if self._on_answer is not None:
            try:
                self._on_answer(status)
            except Exception:  # noqa: BLE001 - a listener's bug must not lose the workers
                log.exception("on_answer failed")
        if status in (401, 403):
            return None, f"Flower answered HTTP {status}: set flower_auth for this host"
        if status != 200:
            return None, f"Flower answered HTTP {status}"
        try:
            data = json.loads(body)
        except ValueError:
            return None, "Flower's workers API did not answer JSON"
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, bool)
                                                 for k, v in data.items()):
            return None, "Flower's workers API answered an unexpected shape (not {worker: bool})"
        return data, ""

    def _get(self) -> tuple[int, bytes]:
        """GET the workers API on the kept connection; one retry on a fresh one if Flower had closed it."""
        reused = self._conn is not None
        try:
            return self._get_once()
        except TimeoutError:  # Flower is slow: no second try, the poll stays bounded by `timeout`
            self._drop()
            raise
        except (http.client.HTTPException, OSError, EOFError):  # e.g. closed while idle: once more, fresh
            self._drop()
            if not reused:
                raise
        except BaseException:
            self._drop()
            raise
        try:
            return self._get_once()
        except BaseException:
            self._drop()
            raise

    def _get_once(self) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = _Connection(self._address, self.timeout, self._open_channel)
        self._conn.request("GET", self._target, headers=self._headers)
        response = self._conn.getresponse()
        body = response.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER or response.will_close or not response.isclosed():
            self._drop()  # the server closes, or the answer was cut: never reuse that connection
        return response.status, body

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a channel of a dead session
                pass

    def close(self) -> None:
        """Close the keep-alive connection to Flower (the collector is being dropped; a running poll fails)."""
        self._drop()

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


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 keep-alive connection over a TCP socket, or over what `open_channel` returns."""

    def __init__(self, address: tuple[str, int], timeout: float, open_channel: ChannelOpener | None) -> None:
        super().__init__(address[0], address[1], timeout=timeout)
        self._open_channel = open_channel
        self._channel_timeout = timeout

    def connect(self) -> None:
        if self._open_channel is None:
            super().connect()
            return
        self.sock = self._open_channel(self._channel_timeout)
