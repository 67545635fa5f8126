"""Local listeners and the data path: accepted socket <-> direct-tcpip channel, with no polling.

One acceptor thread serves every listening socket of the agent (epoll); each accepted connection gets
a thread that opens its channel and then moves bytes both ways, blocked in poll() until either side has
data. TCP_NODELAY is set on every accepted socket. A refused channel fails that connection only and is
recorded on its forward.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import paramiko
import paramiko.pipe

from .config import Forward, warn_if_exposed
from .errors import UsageError

log = logging.getLogger(__name__)

BUFFER = 65536
CHANNEL_OPEN_TIMEOUT = 10.0
ACCEPT_PAUSE = 0.5  # a listener rests this long after accept() failed for lack of descriptors
#: SSH_MSG_CHANNEL_OPEN_FAILURE reason code -> (metric label, message for the operator)
_CHANNEL_REASONS = {
    1: ("administratively_prohibited",
        "administratively prohibited (PermitOpen or AllowTcpForwarding on the host refuses this port)"),
    2: ("connect_failed", "connect failed (nothing listening on that port on the host)"),
    3: ("unknown_channel_type", "unknown channel type"),
    4: ("resource_shortage", "resource shortage on the host"),
}


@dataclass
class ForwardStats:
    """Live counters of one forward (plain ints: the data path never touches a lock or a metric)."""

    forward: Forward
    listening: bool = False
    active: int = 0
    accepted_total: int = 0
    failed_total: int = 0
    bytes_to_remote: int = 0
    bytes_from_remote: int = 0
    last_error: str = ""
    last_error_reason: str = ""  # short label for tunnel_forward_last_error_info, e.g. connect_failed
    last_error_at: float = 0.0
    worked_since_error: bool = True  # a channel opened after the last error (so the next one is news)
    probe_ok: bool | None = None  # None: not probed yet
    probe_detail: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_error(self, message: str, reason: str = "error") -> bool:
        """Remember a failed connection; True if it is news (worth a warning) rather than a repeat."""
        news = self.worked_since_error or reason != self.last_error_reason
        self.last_error, self.last_error_reason, self.last_error_at = message, reason, time.time()
        self.worked_since_error = False
        return news

    def opened(self) -> None:
        with self._lock:
            self.active += 1
            self.accepted_total += 1

    def carried(self, sent: int = 0, received: int = 0) -> None:
        """Count bytes as they pass, so a long-lived (keep-alive) connection shows its traffic at once."""
        with self._lock:
            self.bytes_to_remote += sent
            self.bytes_from_remote += received

    def closed(self) -> None:
        with self._lock:
            self.active -= 1


class ChannelOpener(Protocol):
    """What a forward needs from its host: a channel now, or None if the host stays unreachable."""

    def open_forward_channel(self, forward: Forward, origin: tuple[str, int]) -> paramiko.Channel: ...


def _listener_socket(bind: str) -> socket.socket:
    """An unbound TCP socket for a listener on `bind` (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def port_is_free(bind: str, port: int) -> bool:
    """Whether a listener could bind `bind:port` right now (nothing else holds it)."""
    with _listener_socket(bind) as sock:
        try:
            sock.bind((bind, port))
        except OSError:
            return False
    return True


def bind_listener(forward: Forward) -> socket.socket:
    """Bind forward.bind:forward.local_port, or raise UsageError naming the port and the fix."""
    sock = _listener_socket(forward.bind)
    try:
        sock.bind((forward.bind, forward.local_port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"local port {forward.local} ({forward.name}) is already in use: stop what listens there "
                f"(`ss -ltnp 'sport = :{forward.local_port}'`) or forward another port, e.g. "
                f"-L {forward.local_port + 10000}:{forward.remote_host}:{forward.remote_port}") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"local port {forward.local} ({forward.name}) needs privileges: "
                             "use a port above 1023") from None
        raise UsageError(f"cannot listen on {forward.local} ({forward.name}): {exc.strerror}") from None
    sock.setblocking(False)
    warn_if_exposed(forward.bind, f"forward {forward.name} ({forward.local})")
    return sock


class Acceptor:
    """One thread accepting on every listener; hands each connection to a handler."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._last_warning = -60.0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="acceptor", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, handler: Callable[[socket.socket, tuple], None]) -> None:
        def register() -> None:
            self._selector.register(sock, selectors.EVENT_READ, handler)

        self._call(register)

    def remove(self, sock: socket.socket) -> None:
        """Stop accepting on sock and close it (done on the acceptor thread, so no race with accept)."""
        done = threading.Event()

        def unregister() -> None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            done.set()

        self._call(unregister)
        if threading.current_thread() is not self._thread:
            done.wait(5)

    def _call(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(action)
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        actions, self._pending = self._pending, []
                    for action in actions:
                        action()
                    continue
                listener: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    now = time.monotonic()
                    if now - self._last_warning >= 60:  # at most one warning a minute, however often it fails
                        self._last_warning = now
                        log.warning("accept on %s failed: %s", listener.getsockname(), exc)
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._pause(listener, key.data)  # out of descriptors: do not spin on a ready listener
                    continue
                try:
                    key.data(conn, peer)
                except Exception:  # noqa: BLE001 - e.g. no thread could be started: drop this connection only
                    log.exception("cannot serve a connection from %s", peer)
                    conn.close()

    def _pause(self, sock: socket.socket, handler: Callable[[socket.socket, tuple], None]) -> None:
        """Stop accepting on sock for ACCEPT_PAUSE seconds (called on the acceptor thread)."""
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            return

        def resume() -> None:
            if not self._stopping and sock.fileno() != -1:
                self.add(sock, handler)

        timer = threading.Timer(ACCEPT_PAUSE, resume)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        def stop() -> None:
            self._stopping = True

        self._call(stop)
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class ConnectionSet:
    """The live connections of a forward, so that stop() can close them and join their threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[threading.Thread, list[socket.socket | paramiko.Channel]] = {}

    def add(self, thread: threading.Thread, *ends: socket.socket | paramiko.Channel) -> None:
        with self._lock:
            self._items.setdefault(thread, []).extend(ends)

    def discard(self, thread: threading.Thread) -> None:
        with self._lock:
            self._items.pop(thread, None)

    def close_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            items = list(self._items.items())
        for _, ends in items:
            for end in ends:
                _shutdown(end)
        deadline = time.monotonic() + timeout
        for thread, _ in items:
            thread.join(max(0.0, deadline - time.monotonic()))


def record_refusal(stats: ForwardStats, exc: paramiko.ChannelException) -> str:
    """Record a channel the host refused (PermitOpen, nothing listening) on `stats`; warn once; the message."""
    forward = stats.forward
    reason, text = _CHANNEL_REASONS.get(exc.code, ("channel_refused", exc.text))
    message = f"channel to {forward.remote} refused: {text}"
    news = stats.record_error(message, reason)
    log.log(logging.WARNING if news else logging.DEBUG, "%s: channel to %s refused: %s",
            forward.name, forward.remote, text)
    return message


def serve_connection(conn: socket.socket, peer: tuple, forward: Forward, stats: ForwardStats,
                     opener: ChannelOpener, live: ConnectionSet) -> None:
    """Run in a connection thread: open the channel, then pump until both directions are done."""
    me = threading.current_thread()
    live.add(me, conn)
    stats.opened()
    chan: paramiko.Channel | None = None
    try:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            chan = opener.open_forward_channel(forward, (peer[0], peer[1]))
        except paramiko.ChannelException as exc:
            stats.failed_total += 1
            record_refusal(stats, exc)
            return
        except (paramiko.SSHException, EOFError, OSError, TimeoutError) as exc:
            stats.failed_total += 1
            stats.record_error(f"no SSH connection: {exc}", "ssh_down")
            log.info("%s: connection from %s:%s closed: %s", forward.name, peer[0], peer[1], exc)
            return
        stats.worked_since_error = True
        live.add(me, chan)
        try:
            _pump(conn, chan, stats)
        except OSError as exc:  # e.g. out of descriptors for the channel's pipe: this connection only
            stats.failed_total += 1
            news = stats.record_error(f"connection failed: {exc}", "local_error")
            log.log(logging.WARNING if news else logging.DEBUG, "%s: connection from %s:%s failed: %s",
                    forward.name, peer[0], peer[1], exc)
    finally:
        if chan is not None:
            _shutdown(chan)
        _shutdown(conn)
        conn.close()
        stats.closed()
        live.discard(me)


def _pump(conn: socket.socket, chan: paramiko.Channel, stats: ForwardStats | None = None) -> None:
    """Copy both ways until both sides reached EOF; half-closes are passed on; bytes counted on `stats`."""
    poller = select.poll()
    conn_fd, chan_fd = conn.fileno(), chan.fileno()
    poller.register(conn_fd, select.POLLIN)
    poller.register(chan_fd, select.POLLIN)
    open_fds = {conn_fd, chan_fd}
    while open_fds:
        for fd, _ in poller.poll():
            if fd == conn_fd:
                try:
                    data = conn.recv(BUFFER)
                except OSError:  # reset by the local client: nobody is left to read an answer
                    return
                if data:
                    try:
                        chan.sendall(data)
                    except (OSError, EOFError, paramiko.SSHException):
                        return
                    if stats is not None:
                        stats.carried(sent=len(data))
                else:
                    poller.unregister(conn_fd)
                    open_fds.discard(conn_fd)
                    try:
                        chan.shutdown_write()
                    except (OSError, EOFError):
                        return
            elif fd == chan_fd:
                data = chan.recv(BUFFER)  # after the remote CLOSE, buffered data is still there; then b""
                if data:
                    try:
                        conn.sendall(data)
                    except OSError:
                        return
                    if stats is not None:
                        stats.carried(received=len(data))
                else:
                    poller.unregister(chan_fd)
                    open_fds.discard(chan_fd)
                    try:
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        return
                    if chan.closed:  # remote closed completely: nothing more can be sent either
                        return


class _GuardedPipe(paramiko.pipe.PosixPipe):  # type: ignore[misc]
    """paramiko's channel pipe (what Channel.fileno() polls) with close() serialized against set()/clear().

    Upstream, Channel.close() closes the pipe's descriptors while the transport thread may be feeding
    the channel (paramiko issues #1700, #2271): the feed then writes to a closed descriptor, which kills
    the whole SSH transport with EBADF, or, if the number was reused meanwhile, writes a byte into some
    other socket. Closing a channel while data still arrives is routine here (a client that resets).
    """

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.RLock()

    def close(self) -> None:
        with self._guard:
            if not self._closed:  # type: ignore[has-type]
                self._closed = True
                os.close(self._rfd)
                os.close(self._wfd)

    def clear(self) -> None:
        with self._guard:
            if not self._closed:
                super().clear()

    def set(self) -> None:
        with self._guard:
            super().set()  # a no-op once closed

    def set_forever(self) -> None:
        with self._guard:
            super().set_forever()


if os.name == "posix":
    paramiko.pipe.make_pipe = _GuardedPipe  # what Channel.fileno() calls to create its pipe


def _shutdown(end: socket.socket | paramiko.Channel) -> None:
    try:
        if isinstance(end, paramiko.Channel):
            end.close()
        else:
            end.shutdown(socket.SHUT_RDWR)
    except (OSError, EOFError, paramiko.SSHException):  # a channel of a transport that is already gone
        pass
