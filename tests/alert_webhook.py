"""An Alertmanager webhook receiver for tests: records every notification with the time it arrived.

Alertmanager POSTs `{"status": ..., "alerts": [{"status", "labels", "annotations", "startsAt", ...}], ...}`
(the webhook_config payload, version 4). Each alert of each POST becomes one `Notification`, so a test can
wait for "WorkerDown firing for celery@w1 on prod-1" and read when it arrived.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping


@dataclass(frozen=True)
class Notification:
    """One alert of one webhook POST."""

    received: float  # time.monotonic() when it arrived
    status: str  # firing | resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    def matches(self, alertname: str, status: str, labels: Mapping[str, str]) -> bool:
        return (self.alertname == alertname and self.status == status
                and all(self.labels.get(k) == v for k, v in labels.items()))


class WebhookReceiver:
    """A threaded HTTP server on 127.0.0.1:<ephemeral>; `url` is what Alertmanager posts to."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._record(json.loads(body or b"{}"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/alerts"

    def _record(self, payload: dict) -> None:
        now = time.monotonic()
        with self._cond:
            for alert in payload.get("alerts", []):
                self.notifications.append(Notification(now, alert.get("status", ""), dict(alert.get("labels", {})),
                                                       dict(alert.get("annotations", {}))))
            self._cond.notify_all()

    def find(self, alertname: str, status: str = "firing", since: float = 0.0,
             **labels: str) -> Notification | None:
        """The first matching notification received at or after `since` (monotonic), if any."""
        with self._cond:
            return next((n for n in self.notifications
                         if n.received >= since and n.matches(alertname, status, labels)), None)

    def wait_for(self, alertname: str, status: str = "firing", since: float = 0.0, timeout: float = 60.0,
                 **labels: str) -> Notification:
        """Block until a matching notification arrives; TimeoutError naming what did arrive otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((n for n in self.notifications
                              if n.received >= since and n.matches(alertname, status, labels)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({f"{n.alertname}/{n.status}{_short(n.labels)}" for n in self.notifications
                                   if n.received >= since})
                    raise TimeoutError(f"no {alertname} {status} {labels or ''} within {timeout:.0f}s; "
                                       f"received since: {seen or 'nothing'}")
                self._cond.wait(left)

    def since(self, since: float) -> list[Notification]:
        with self._cond:
            return [n for n in self.notifications if n.received >= since]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _short(labels: Mapping[str, str]) -> str:
    keep = {k: v for k, v in labels.items() if k in ("host", "worker", "forward", "job")}
    return str(keep) if keep else ""
