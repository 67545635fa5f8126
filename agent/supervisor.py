"""Keeps one host's SSH connection alive and its forwards usable, for months.

A HostTunnel owns the host's listeners (bound once, kept while SSH is down) and one supervisor thread
that connects, watches the link with keepalives, and reconnects with backoff after any drop. A local
connection that arrives while the link is down waits up to `connect_wait` seconds (default 2) for the
reconnect — and nudges it to happen now — then is closed: never a hang.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paramiko

from .auth import Identities
from .backoff import Backoff
from .config import Forward, HostConfig
from .connection import Cancel, SSHSession, connect
from .errors import AgentError, ConnectError
from .forward import CHANNEL_OPEN_TIMEOUT, Acceptor, ConnectionSet, ForwardStats, bind_listener, serve_connection

log = logging.getLogger(__name__)

NUDGE_MIN_INTERVAL = 1.0  # a waiting local connection may trigger a reconnect at most this often
STABLE_AFTER = 10.0  # a session that lasted this long resets the backoff (the next retry is at once)
REPEAT_LOG_INTERVAL = 60.0  # the same connection error is logged again at most this often
MAX_PENDING_DURATIONS = 1000  # connect durations kept for the histogram between two scrapes


@dataclass
class HostStats:
    """Live state of one host, read by the status display and the metrics collector."""

    state: str = "starting"  # starting | connecting | up | backoff | stopped
    since: float = field(default_factory=time.time)
    connects_total: int = 0
    reconnects_total: int = 0
    failures_total: int = 0
    last_error: str = ""
    last_error_reason: str = ""
    last_error_at: float = 0.0
    rtt: float | None = None
    auth_method: str = ""
    retry_at: float = 0.0
    connect_durations: list[float] = field(default_factory=list)  # drained by the metrics collector

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state, self.since = state, time.time()


class HostTunnel:
    """One host: its listeners, its SSH session, its supervisor thread."""

    def __init__(self, host: HostConfig, identities: Identities, acceptor: Acceptor, *,
                 connect_wait: float = 2.0, backoff: Backoff | None = None,
                 jump_identities: Identities | None = None,
                 on_change: Callable[["HostTunnel"], None] = lambda tunnel: None) -> None:
        self.host = host
        self.identities = identities
        self.jump_identities = jump_identities
        self.acceptor = acceptor
        self.connect_wait = connect_wait
        self.backoff = backoff or Backoff()
        self.on_change = on_change
        self.stats = HostStats()
        self.forwards: dict[str, ForwardStats] = {f.name: ForwardStats(f) for f in host.forwards}
        self._listeners: list = []
        self._live = ConnectionSet()
        self._session: SSHSession | None = None
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._last_nudge = 0.0
        self._cancel = Cancel()
        self._token: object | None = None  # the attempt/session whose events may wake the supervisor
        self._session_wake: Callable[[], None] = lambda: None
        self._logged_error, self._logged_at, self._repeats = "", 0.0, 0  # de-duplicates failure warnings
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind every local listener now (so a busy port is reported at start-up, before connecting)."""
        try:
            for forward in self.host.forwards:
                self._listeners.append((bind_listener(forward), forward))
        except AgentError:
            for sock, _ in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        for stats in self.forwards.values():
            stats.listening = True

    def start(self) -> None:
        for sock, forward in self._listeners:
            self.acceptor.add(sock, self._make_handler(forward))
        self._thread = threading.Thread(target=self._supervise, name=f"supervisor-{self.host.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close listeners, connections and the SSH session; join every thread we started."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._wake.set()
        self._cancel.cancel()  # a connection attempt in progress (e.g. to a blackholed host) ends now
        for sock, _ in self._listeners:
            self.acceptor.remove(sock)
        self._listeners.clear()
        for stats in self.forwards.values():
            stats.listening = False
        self._live.close_all()
        if self._thread is not None:
            self._thread.join(10)
            if not self._thread.is_alive():
                self._cancel.close()
        self.stats.set_state("stopped")

    # -- used by the data path --------------------------------------------------------------------
    def open_forward_channel(self, forward: Forward, origin: tuple[str, int],
                             timeout: float = CHANNEL_OPEN_TIMEOUT) -> paramiko.Channel:
        """A direct-tcpip channel to the forward's remote port; waits up to `connect_wait` for the link.

        A channel the host refuses (PermitOpen, nothing listening) fails at once. A session that dies
        while the channel is being opened (the connection was accepted at the instant of a drop) is not
        the client's problem: it waits for the reconnect within the same `connect_wait`, and tries again.
        """
        deadline = time.monotonic() + self.connect_wait
        while True:
            session = self._session_or_wait(deadline)
            if session is None:
                raise ConnectionError(f"SSH to {self.host.destination} is down "
                                      f"({self.stats.last_error or 'connecting'})")
            try:
                return session.open_channel(forward.remote_host, forward.remote_port, origin, timeout)
            except paramiko.ChannelException:
                raise  # the host said no: the session is fine
            except (paramiko.SSHException, EOFError, OSError):
                if session.active or time.monotonic() >= deadline:
                    raise

    def _session_or_wait(self, deadline: float) -> SSHSession | None:
        with self._cond:
            while not self._stopping:
                session = self._session
                if session is not None and session.active:
                    return session
                self._nudge()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
        return None

    def _nudge(self) -> None:
        """A client is waiting: retry now instead of at the end of the backoff (rate-limited)."""
        now = time.monotonic()
        if self.stats.state == "backoff" and now - self._last_nudge >= NUDGE_MIN_INTERVAL \
                and self.stats.last_error_reason not in _SLOW_REASONS:
            self._last_nudge = now
            self._wake.set()

    def _make_handler(self, forward: Forward) -> Callable:
        stats = self.forwards[forward.name]

        def handle(conn, peer) -> None:
            threading.Thread(target=serve_connection, args=(conn, peer, forward, stats, self, self._live),
                             name=f"conn-{self.host.name}-{forward.name}", daemon=True).start()

        return handle

    # -- the supervisor thread ----------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stopping:
            self.stats.set_state("connecting")
            self._changed()
            try:
                session = self._connect()
            except ConnectError as exc:
                self._failed(exc.reason, str(exc), exc.slow_retry, attempt=True)
                continue
            except Exception as exc:  # a bug or an unexpected library error must not kill the thread
                log.exception("%s: unexpected error while connecting", self.host.name)
                self._failed("internal", f"unexpected error: {exc}", False, attempt=True)
                continue
            self._up(session)
            up_since = time.monotonic()
            reason, message = self._watch(session)
            detected_at = time.time()  # the moment the drop was seen (closing the session may take a while)
            self._down(session)
            if time.monotonic() - up_since >= STABLE_AFTER:
                self.backoff.reset()  # a flapping link keeps its backoff; a long-lived one starts afresh
            if self._stopping:
                break
            self._failed(reason, message, False, at=detected_at)
        self.stats.set_state("stopped")
        self._changed()

    def _waker(self) -> Callable[[], None]:
        """A wake-up callback for the current attempt only: a late event of an old (failed or dropped)
        transport, e.g. its reader thread ending, must not cut a backoff wait short."""
        token = self._token = object()

        def wake() -> None:
            if self._token is token:
                self._wake.set()

        return wake

    def _connect(self) -> SSHSession:
        self._wake.clear()
        started = time.monotonic()
        self._session_wake = self._waker()
        try:
            session = connect(self.host, self.identities, on_close=self._session_wake,
                              jump_identities=self.jump_identities, cancel=self._cancel)
        finally:
            self._cancel.forget()
        if len(self.stats.connect_durations) < MAX_PENDING_DURATIONS:  # nobody scraping: do not grow forever
            self.stats.connect_durations.append(time.monotonic() - started)
        return session

    def _up(self, session: SSHSession) -> None:
        with self._cond:
            if self.stats.connects_total:
                self.stats.reconnects_total += 1
            self.stats.connects_total += 1
            self._session = session
            self.stats.auth_method = session.auth_method
            self.stats.rtt = None
            self.stats.set_state("up")
            self._cond.notify_all()
        self._logged_error, self._repeats = "", 0  # after a recovery, the next failure is news again
        if self.stats.last_error_reason in _SLOW_REASONS:
            self.backoff.reset()
        log.info("%s: connected to %s (%s, %s)", self.host.name, self.host.destination,
                 session.auth_method, session.host_key)
        self._changed()

    def _down(self, session: SSHSession) -> None:
        self._token = None
        with self._cond:
            self._session = None
        for stats in self.forwards.values():
            stats.probe_ok = None  # forward_up needs a fresh probe through the next session
        session.close()
        session.join()

    def _watch(self, session: SSHSession) -> tuple[str, str]:
        """Block until the link dies or we stop, sending keepalives. Returns (reason, message).

        As OpenSSH's ServerAliveInterval/CountMax: a keepalive every `interval`; the link is dead when
        nothing answered for interval x count seconds. A TCP-level drop wakes us at once (on_close).
        """
        interval = self.host.server_alive_interval
        last_reply = time.monotonic()
        sent_at = last_reply - interval  # the first keepalive goes at once: it measures the RTT
        pending = None  # the keepalive in flight; the next one goes only after its reply, so RTTs pair up
        while True:
            self._wake.clear()  # cleared before looking, so a close that happens after is not missed
            if self._stopping:
                return "stopped", "stopped"
            if not session.active:
                cause = session.transport.get_exception()
                detail = f" ({cause})" if cause is not None and not isinstance(cause, EOFError) and str(cause) else ""
                return "disconnected", f"connection to {self.host.destination} closed by the host or network{detail}"
            now = time.monotonic()
            if pending is not None and pending.is_set():
                last_reply = pending.at
                self.stats.rtt = pending.at - sent_at
                pending = None
            if now - last_reply >= self.host.dead_after:
                return ("keepalive_timeout",
                        f"no answer from {self.host.destination} for {now - last_reply:.0f}s "
                        f"({self.host.server_alive_count_max} keepalives, {interval:g}s apart): link dead")
            if pending is None and now - sent_at >= interval:
                try:
                    pending = session.transport.send_keepalive(self._session_wake)
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    return "disconnected", f"connection to {self.host.destination} lost: {exc}"
                sent_at = now
            next_keepalive = sent_at + interval if pending is None else float("inf")
            self._wake.wait(max(0.0, min(next_keepalive, last_reply + self.host.dead_after) - now))

    def _failed(self, reason: str, message: str, slow: bool, at: float | None = None, attempt: bool = False) -> None:
        """Record a failed connection attempt (attempt=True) or a drop, then wait out the backoff."""
        if self._stopping:
            return
        self._token = None
        delay = self.backoff.next_delay(slow or reason in _SLOW_REASONS, refused=reason == "refused")
        if attempt:
            self.stats.failures_total += 1
        self.stats.last_error, self.stats.last_error_reason = message, reason
        self.stats.last_error_at = at or time.time()
        self.stats.retry_at = time.time() + delay
        self.stats.set_state("backoff")
        self._log_failure(message, delay)
        self._changed()
        self._wake.clear()
        if delay > 0:
            self._wake.wait(delay)  # a nudge from a waiting client or stop() ends the wait early

    def _log_failure(self, message: str, delay: float) -> None:
        """A warning when the error is new, then at most one a minute while it repeats (debug otherwise):
        a host whose sshd stays off is retried every second and must not flood the journal."""
        now = time.monotonic()
        if message != self._logged_error or now - self._logged_at >= REPEAT_LOG_INTERVAL:
            repeats = f"; {self._repeats} more since {now - self._logged_at:.0f}s ago" \
                if self._repeats and message == self._logged_error else ""
            log.warning("%s: %s (retry in %.1fs%s)", self.host.name, message, delay, repeats)
            self._logged_error, self._logged_at, self._repeats = message, now, 0
        else:
            self._repeats += 1
            log.debug("%s: %s (retry in %.1fs)", self.host.name, message, delay)

    def _changed(self) -> None:
        try:
            self.on_change(self)
        except Exception:  # noqa: BLE001 - observers must not break the supervisor
            log.exception("status observer failed")


_SLOW_REASONS = {"auth_failed", "no_key", "host_key_unknown", "host_key_changed", "host_key_revoked"}
