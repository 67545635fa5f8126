"""The HTTP API: enqueue transcriptions, read results, and expose the seed's metrics on /metrics.

Metrics (prometheus-client, exactly the seed's table):
  http_requests_total{method,endpoint,status}          counter
  http_request_duration_seconds{method,endpoint}       histogram
  http_requests_in_progress                            gauge
`endpoint` is the route template (`/transcribe`, `/jobs/{id}`, `/health`, `other`), never the raw path.
/metrics itself is not counted. A configurable fraction of requests to the other routes answers 500
(PIPELINE_API_ERROR_RATE, or POST /admin/error-rate when PIPELINE_ADMIN=1) so alerts can be exercised.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import db
from .settings import Settings

log = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """The three API metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests_total", "Total HTTP requests by method, endpoint, status.",
                                ["method", "endpoint", "status"], registry=self.registry)
        self.duration = Histogram("http_request_duration_seconds", "Request latency.", ["method", "endpoint"],
                                  buckets=BUCKETS, registry=self.registry)
        self.in_progress = Gauge("http_requests_in_progress", "Currently active requests.", registry=self.registry)


class FaultInjector:
    """Answers a fraction of requests with 500; the fraction can change at run time."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._lock = threading.Lock()

    @property
    def rate(self) -> float:
        with self._lock:
            return self._rate

    def set_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"error rate {rate!r} is not between 0 and 1")
        with self._lock:
            self._rate = rate

    def fail_now(self) -> bool:
        return random.random() < self.rate


def route(path: str) -> str:
    """The endpoint label of a request path (bounded cardinality)."""
    path = path.split("?", 1)[0]
    if path == "/transcribe":
        return "/transcribe"
    if path.startswith("/jobs/") and path.count("/") == 2:
        return "/jobs/{id}"
    if path in ("/health", "/metrics", "/admin/error-rate"):
        return path
    return "other"


def make_handler(settings: Settings, metrics: ApiMetrics, faults: FaultInjector,
                 enqueue: Callable[[float | None], str]) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to this API's state."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-api/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:  # quiet: metrics are the log
            log.debug(fmt, *args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def _handle(self, method: str) -> None:
            endpoint = route(self.path)
            if endpoint == "/metrics" and method == "GET":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                return
            if endpoint == "/admin/error-rate":
                self._admin(method)
                return
            start = time.perf_counter()
            metrics.in_progress.inc()
            status = 500
            try:
                status, body = self._dispatch(method, endpoint)
                self._send(status, json.dumps(body).encode(), "application/json")
            finally:
                metrics.in_progress.dec()
                metrics.duration.labels(method, endpoint).observe(time.perf_counter() - start)
                metrics.requests.labels(method, endpoint, str(status)).inc()

        def _dispatch(self, method: str, endpoint: str) -> tuple[int, object]:
            body = self._body()
            if endpoint == "other":
                return 404, {"error": "not found"}
            if faults.fail_now():
                return 500, {"error": "injected failure"}
            try:
                if endpoint == "/health" and method == "GET":
                    return 200, {"status": "ok"}
                if endpoint == "/transcribe" and method == "POST":
                    request = json.loads(body or b"{}")
                    seconds = request.get("audio_seconds") if isinstance(request, dict) else None
                    return 202, {"task_id": enqueue(seconds)}
                if endpoint == "/jobs/{id}" and method == "GET":
                    result = db.fetch(settings.database_url, self.path.split("?", 1)[0].rsplit("/", 1)[1])
                    return (200, result) if result else (404, {"error": "no such job (yet)"})
            except (ValueError, TypeError) as exc:
                return 400, {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - the broker or PostgreSQL is down: a real 5xx
                log.warning("request failed: %s", exc)
                return 503, {"error": type(exc).__name__}
            return 405, {"error": "method not allowed"}

        def _admin(self, method: str) -> None:
            body = self._body()
            if not settings.admin:
                self._send(404, b'{"error": "admin endpoint disabled (PIPELINE_ADMIN=1)"}', "application/json")
                return
            if method == "POST":
                try:
                    text = body.decode().strip()
                    value = json.loads(text)
                    faults.set_rate(float(value["rate"] if isinstance(value, dict) else value))
                except (ValueError, KeyError, TypeError) as exc:
                    self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")
                    return
            self._send(200, json.dumps({"rate": faults.rate}).encode(), "application/json")

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve(settings: Settings, ready: Callable[[str], None] = print) -> None:
    """Run the API until interrupted (SIGTERM/SIGINT)."""
    from . import tasks

    host, _, port = settings.api_addr.rpartition(":")
    metrics = ApiMetrics()
    faults = FaultInjector(settings.api_error_rate)

    def enqueue(seconds: float | None) -> str:
        return tasks.transcribe.apply_async(kwargs={"audio_seconds": seconds}, retry=False).id

    try:
        db.ensure_schema(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - the API still serves /metrics and /health without PostgreSQL
        log.warning("results table not ensured: %s", exc)
    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)),
                                 make_handler(settings, metrics, faults, enqueue))
    server.daemon_threads = True
    ready(f"listening on http://{settings.api_addr}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
