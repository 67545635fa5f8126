"""Forward health probes: is the exporter behind each forward really answering, through the tunnel?

`tunnel_forward_up` means "a channel to the remote port opens and the exporter answers", so the prober
fetches each forward's metrics path through its own local listener (exactly what Prometheus does) every
`probe_interval` seconds with `requests`, on a `schedule` job, and at once when a host comes up. Probes of
many forwards run in a small thread pool, so one slow exporter never delays the others.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import requests
import schedule

from .config import Forward
from .forward import ForwardStats
from .supervisor import HostTunnel

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
PROBE_WORKERS = 8


def probe_url(forward: Forward) -> str:
    host = "127.0.0.1" if forward.bind in ("0.0.0.0", "::", "") else forward.bind
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{forward.local_port}{forward.path}"


def probe_forward(stats: ForwardStats, timeout: float = PROBE_TIMEOUT) -> bool:
    """Fetch the forward's metrics page once; record the outcome on `stats`; return whether it answered.

    Each probe uses its own connection and closes it: a pooled keep-alive socket would hold a tunnel
    connection (and its thread) open between probes after the exporter has closed its end.
    """
    forward = stats.forward
    try:
        with requests.Session() as session:
            session.trust_env = False  # never send probes of 127.0.0.1 to an HTTP(S)_PROXY
            response = session.get(probe_url(forward), timeout=timeout, auth=forward.basic_auth,
                                   headers={"Connection": "close"})
    except requests.RequestException as exc:
        started = time.time() - timeout - 1
        channel_error = stats.last_error if stats.last_error_at >= started else ""
        stats.probe_ok, stats.probe_detail = False, channel_error or _why(exc, forward)
        return False
    if response.status_code >= 500:
        stats.probe_ok, stats.probe_detail = False, f"exporter answered HTTP {response.status_code}"
    elif response.status_code in (401, 403):
        stats.probe_ok = False
        stats.probe_detail = (f"exporter answered HTTP {response.status_code}: set basic auth for "
                              f"{forward.name} in the config")
    else:
        stats.probe_ok, stats.probe_detail = True, f"HTTP {response.status_code}, {len(response.content)} bytes"
    return bool(stats.probe_ok)


def _why(exc: requests.RequestException, forward: Forward) -> str:
    if isinstance(exc, requests.Timeout):
        return f"no answer from the exporter on {forward.remote} within {PROBE_TIMEOUT:g}s"
    return f"exporter on {forward.remote} did not answer (channel refused or closed)"


class Prober:
    """Runs probes on a schedule in one background thread; `probe_host` probes one host at once."""

    def __init__(self, tunnels: Callable[[], Iterable[HostTunnel]], interval: float,
                 extra_jobs: Iterable[Callable[[], None]] = ()) -> None:
        self._tunnels = tunnels
        self._scheduler = schedule.Scheduler()
        self._scheduler.every(max(1, round(interval))).seconds.do(self.probe_all)
        self._extra_jobs = list(extra_jobs)
        self._pool = ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="probe")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def add_job(self, job: Callable[[], None]) -> None:
        """Another periodic read (e.g. a collector's poll) run with each probe round."""
        self._extra_jobs.append(job)

    def remove_job(self, job: Callable[[], None]) -> None:
        if job in self._extra_jobs:
            self._extra_jobs.remove(job)

    def start(self) -> None:
        self._thread.start()

    def probe_all(self) -> None:
        for tunnel in list(self._tunnels()):
            self.probe_host(tunnel)
        for job in list(self._extra_jobs):
            self._submit(job)

    def probe_host(self, tunnel: HostTunnel) -> None:
        """Probe every forward of one host now, if it is up (a down host's forwards read 0 anyway)."""
        if tunnel.stats.state != "up":
            return
        for stats in tunnel.forwards.values():
            self._submit(functools.partial(probe_forward, stats))

    def _submit(self, job: Callable[[], object]) -> None:
        if not self._stop.is_set():
            try:
                self._pool.submit(self._guarded, job)
            except RuntimeError:  # the pool is shutting down
                pass

    @staticmethod
    def _guarded(job: Callable[[], object]) -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - a probe bug must not kill the pool
            log.exception("probe failed")

    def _loop(self) -> None:
        self.probe_all()
        while not self._stop.is_set():
            idle = self._scheduler.idle_seconds
            if self._stop.wait(max(0.05, idle if idle is not None else 1.0)):
                break
            self._scheduler.run_pending()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
