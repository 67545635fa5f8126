"""Forward health probes: does a channel to each forward's remote port open, and does the exporter answer?

`tunnel_forward_up` means "a channel to the remote port opens and the exporter answers", so the prober
opens a direct-tcpip channel on the host's SSH session (`HostTunnel.open_forward_channel`, no local
socket, no accept thread, no pump), sends a minimal `GET <path> HTTP/1.0` (with `Authorization: Basic`
when the forward has credentials), reads the status line, drains the answer (at most PROBE_MAX_BYTES,
within the timeout) and closes. The listener itself has its own `tunnel_forward_listening`.

Outcomes (`ForwardStats.probe_ok` / `probe_detail`): HTTP < 500 other than 401/403 -> up; HTTP >= 500 ->
down; 401/403 -> down with a "set basic auth" hint; a refused channel -> down with the channel error
(e.g. "administratively prohibited"), also recorded as the forward's last error; no status line within
PROBE_TIMEOUT -> down.

Rounds run every `probe_interval` seconds on a `schedule` job (and for one host at once when it comes
up), on a small thread pool so one slow exporter never delays the others. A forward whose previous probe
is still running is skipped for that round (a slow exporter that serves one scrape at a time never gets a
queue of probes).

Passive health: a forward whose last probe was good is not probed again in a round when real traffic
proved the path since the previous round: `bytes_from_remote` grew (counted as the bytes pass, so a
scraper's keep-alive connection counts too: the remote side sent bytes through a channel since) and
`failed_total` did not (no connection got a refused channel since).
Bytes from the remote are weaker evidence than a probe: they prove the channel opens and that
something on the remote port answers, not that it answered HTTP 2xx (a 5xx or 401 page is bytes too).
That is accepted because (1) the scraper that made the traffic sees the HTTP status itself (Prometheus's
`up`), (2) only a forward whose last probe was *good* is skipped, so a forward never turns up on traffic
alone, and (3) a forward is actively probed at least every PASSIVE_MAX_ROUNDS rounds whatever the traffic,
so an exporter that starts answering 5xx reads down within PASSIVE_MAX_ROUNDS x probe_interval.
An HTTP answer (< 500, not 401/403) that another reader of the same remote port got through its own
channel since the previous round counts as the same evidence (`Prober.answered`: the Celery collector
reads Flower every 5 s, so the `flower` forward needs no probe of its own in between).

Other periodic reads (e.g. the Celery collector's poll) run on the same scheduler and pool, on their
own interval (`add_job(job, interval)`).
"""
from __future__ import annotations

import base64
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import paramiko
import schedule

from . import __version__
from .config import Forward
from .forward import ForwardStats, record_refusal
from .supervisor import HostTunnel

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0
PROBE_WORKERS = 8
PROBE_MAX_BYTES = 8 * 1024 * 1024  # drained at most (a big exporter page is a few MB at worst)
PASSIVE_MAX_ROUNDS = 4  # with traffic proving the path, still probe every 4th round (60 s at 15 s)
PROBE_ORIGIN = ("127.0.0.1", 0)  # the originator address sent in the channel open
_STATUS_LINE_MAX = 65536


def probe_url(forward: Forward) -> str:
    """The URL of the forward's metrics page through its local listener (what Prometheus scrapes)."""
    host = "127.0.0.1" if forward.bind in ("0.0.0.0", "::", "") else forward.bind
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{forward.local_port}{forward.path}"


def probe_request(forward: Forward) -> bytes:
    """The bytes of the probe's `GET <path> HTTP/1.0` request."""
    host = f"[{forward.remote_host}]" if ":" in forward.remote_host else forward.remote_host
    lines = [f"GET {forward.path or '/'} HTTP/1.0", f"Host: {host}:{forward.remote_port}",
             f"User-Agent: tunnel-agent-probe/{__version__}", "Accept: */*", "Connection: close"]
    if forward.basic_auth is not None:
        token = base64.b64encode(":".join(forward.basic_auth).encode()).decode()
        lines.append(f"Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def probe_forward(tunnel: HostTunnel, stats: ForwardStats, timeout: float = PROBE_TIMEOUT) -> bool:
    """GET the forward's metrics path on a fresh channel; record the outcome on `stats`; return whether it answered."""
    ok, detail = _probe(tunnel, stats, timeout)
    stats.probe_ok, stats.probe_detail = ok, detail
    return ok


def _probe(tunnel: HostTunnel, stats: ForwardStats, timeout: float) -> tuple[bool, str]:
    forward = stats.forward
    deadline = time.monotonic() + timeout
    try:
        chan = tunnel.open_forward_channel(forward, PROBE_ORIGIN, timeout)
    except paramiko.ChannelException as exc:
        return False, record_refusal(stats, exc)
    except (paramiko.SSHException, EOFError, OSError, TimeoutError) as exc:
        return False, f"no SSH connection: {exc}"
    stats.worked_since_error = True
    try:
        return _exchange(chan, forward, deadline, timeout)
    finally:
        try:
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass


def _exchange(chan: paramiko.Channel, forward: Forward, deadline: float, timeout: float) -> tuple[bool, str]:
    """Send the request, read the status line and drain; every blocking call bounded by `deadline`."""
    head = b""
    body = 0
    code: int | None = None
    try:
        chan.settimeout(max(0.01, deadline - time.monotonic()))
        chan.sendall(probe_request(forward))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            chan.settimeout(remaining)
            data = chan.recv(65536)
            if not data:
                break
            if code is None:
                head += data
                if b"\r\n" not in head:
                    if len(head) > _STATUS_LINE_MAX:
                        return False, f"exporter on {forward.remote} did not answer HTTP"
                    continue
                code = _status_code(head)
                if code is None:
                    return False, f"exporter on {forward.remote} did not answer HTTP"
                end = head.find(b"\r\n\r\n")
                body = len(head) - end - 4 if end >= 0 else 0
            else:
                body += len(data)
            if len(head) + body >= PROBE_MAX_BYTES:
                break
    except TimeoutError:
        if code is None:
            return False, f"no answer from the exporter on {forward.remote} within {timeout:g}s"
        # the status line came, the rest is slow: judge on the status line
    except (OSError, EOFError, paramiko.SSHException) as exc:
        if code is None:
            return False, f"exporter on {forward.remote} did not answer: {exc}"
    if code is None:
        return False, f"exporter on {forward.remote} closed the connection without answering"
    if code >= 500:
        return False, f"exporter answered HTTP {code}"
    if code in (401, 403):
        return False, f"exporter answered HTTP {code}: set basic auth for {forward.name} in the config"
    return True, f"HTTP {code}, {body} bytes"


def _status_code(head: bytes) -> int | None:
    parts = head.split(b"\r\n", 1)[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


class Prober:
    """Runs probe rounds and other periodic jobs on a schedule in one background thread."""

    def __init__(self, tunnels: Callable[[], Iterable[HostTunnel]], interval: float,
                 extra_jobs: Iterable[Callable[[], None]] = ()) -> None:
        self._tunnels = tunnels
        self._scheduler = schedule.Scheduler()
        self._scheduler.every(max(1, round(interval))).seconds.do(self.probe_all)
        self._extra_jobs = list(extra_jobs)
        self._timed: dict[Callable[[], None], schedule.Job] = {}
        self._pool = ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="probe")
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()  # id() of ForwardStats being probed (dataclasses are unhashable)
        #: id(stats) -> (stats, (bytes_from_remote, failed_total), rounds skipped) at the last round
        self._seen: dict[int, tuple[ForwardStats, tuple[int, int], int]] = {}
        self._answered: set[int] = set()  # id() of ForwardStats another reader got an HTTP answer through
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prober", daemon=True)

    def add_job(self, job: Callable[[], None], interval: float | None = None) -> None:
        """Another periodic read (e.g. a collector's poll): every `interval` seconds, or with each round if None.

        The job runs on the pool and must return at once if its previous run is still going.
        """
        if interval is None:
            self._extra_jobs.append(job)
            return
        with self._lock:
            self._timed[job] = self._scheduler.every(max(1, round(interval))).seconds.do(self._submit, job)
        if self._thread.is_alive():
            self._submit(job)  # the first read now, not one interval later

    def remove_job(self, job: Callable[[], None]) -> None:
        if job in self._extra_jobs:
            self._extra_jobs.remove(job)
        with self._lock:
            timed = self._timed.pop(job, None)
        if timed is not None:
            self._scheduler.cancel_job(timed)

    def start(self) -> None:
        self._thread.start()

    def probe_all(self) -> None:
        """One round: probe every forward of every host that is up (except those skipped, see module doc)."""
        tunnels = list(self._tunnels())
        live = {id(stats) for tunnel in tunnels for stats in tunnel.forwards.values()}
        with self._lock:
            for key in [k for k in self._seen if k not in live]:
                del self._seen[key]
            self._answered &= live
        for tunnel in tunnels:
            self.probe_host(tunnel, passive=True)
        for job in list(self._extra_jobs):
            self._submit(job)

    def probe_host(self, tunnel: HostTunnel, passive: bool = False) -> None:
        """Probe every forward of one host now, if it is up (a down host's forwards read 0 anyway).

        With `passive`, a forward that real traffic proved since the previous round is skipped.
        """
        if tunnel.stats.state != "up":
            return
        for stats in tunnel.forwards.values():
            if self._should_probe(stats, passive):
                self._submit(functools.partial(self._probe_once, tunnel, stats))

    def answered(self, stats: ForwardStats, status: int) -> None:
        """Another reader (e.g. the Celery collector) got HTTP `status` from the forward's remote port."""
        if status < 500 and status not in (401, 403):
            with self._lock:
                self._answered.add(id(stats))

    def _should_probe(self, stats: ForwardStats, passive: bool) -> bool:
        key = id(stats)
        counters = (stats.bytes_from_remote, stats.failed_total)
        with self._lock:
            if key in self._in_flight:
                return False  # the previous probe is still running: never queue another behind it
            previous = self._seen.get(key)
            answered = key in self._answered
            self._answered.discard(key)
            if passive and previous is not None and previous[0] is stats:
                (received, failed), skipped = previous[1], previous[2]
                traffic = counters[0] > received
                proved = (traffic or answered) and counters[1] == failed
                if proved and stats.probe_ok and skipped + 1 < PASSIVE_MAX_ROUNDS:
                    self._seen[key] = (stats, counters, skipped + 1)
                    return False
            self._seen[key] = (stats, counters, 0)
            self._in_flight.add(key)
            return True

    def _probe_once(self, tunnel: HostTunnel, stats: ForwardStats) -> None:
        try:
            probe_forward(tunnel, stats)
        finally:
            with self._lock:
                self._in_flight.discard(id(stats))

    def _submit(self, job: Callable[[], object]) -> None:
        if not self._stop.is_set():
            try:
                self._pool.submit(self._guarded, job)
                return
            except RuntimeError:  # the pool is shutting down
                pass
        if isinstance(job, functools.partial) and job.func == self._probe_once:
            with self._lock:
                self._in_flight.discard(id(job.args[1]))

    @staticmethod
    def _guarded(job: Callable[[], object]) -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - a probe bug must not kill the pool
            log.exception("probe failed")

    def _loop(self) -> None:
        self.probe_all()
        with self._lock:
            timed = list(self._timed)
        for job in timed:
            self._submit(job)
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
