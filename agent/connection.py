"""One SSH connection to one host (optionally through jump hosts), tuned for small fast scrapes.

- TCP_NODELAY on the socket: a /metrics reply is many small SSH packets; with Nagle on, each waits
  for a delayed ACK (sshtunnel's 6x latency).
- AES-GCM first: one AEAD pass instead of cipher + MAC.
- Keepalives like OpenSSH's ServerAliveInterval/CountMax (keepalive@openssh.com with want-reply),
  which also give the round-trip time.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST
from paramiko.message import Message

from .auth import Identities, authenticate
from .config import HostConfig
from .errors import ConnectError
from .hostkeys import HostKeyChecker

log = logging.getLogger(__name__)

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
#: How often paramiko's reader thread wakes to check for shutdown (its default, 0.1 s, costs idle CPU
#: per host; we wake it explicitly with shutdown() instead).
READER_WAKE_INTERVAL = 2.0


class AgentTransport(paramiko.Transport):
    """A paramiko Transport that reports its own end and can measure keepalive round trips."""

    def __init__(self, sock: socket.socket | paramiko.Channel, on_close: Callable[[], None]) -> None:
        super().__init__(sock)
        self._on_close = on_close
        self._keepalive_lock = threading.Lock()

    def run(self) -> None:  # the reader thread
        try:
            super().run()
        finally:
            self._on_close()

    def send_keepalive(self, on_reply: Callable[[], None] = lambda: None) -> "Reply":
        """Send keepalive@openssh.com with want-reply; the returned event is set when any reply comes.

        `on_reply` runs (on the reader thread) when it comes, so the watcher can take the RTT at once.
        """
        with self._keepalive_lock:
            replied = Reply(on_reply)
            self.completion_event = replied  # paramiko sets it on REQUEST_SUCCESS/FAILURE
            message = Message()
            message.add_byte(cMSG_GLOBAL_REQUEST)
            message.add_string("keepalive@openssh.com")
            message.add_boolean(True)
            self._send_user_message(message)
            return replied


class Reply(threading.Event):
    """An event that remembers when it was set (the keepalive reply's arrival) and calls back."""

    def __init__(self, on_set: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.at = 0.0
        self._on_set = on_set

    def set(self) -> None:
        self.at = time.monotonic()
        super().set()
        self._on_set()


class Cancel:
    """Lets another thread abort a connection attempt in progress (TCP connect, handshake or auth) at once.

    The TCP connect waits in select() on the socket and on this object's wake-up socket; later phases
    are ended by shutting down the socket they read from. One Cancel serves one supervisor for its life.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cancelled = False

    def fileno(self) -> int:
        return self._r.fileno()

    def track(self, sock: socket.socket) -> None:
        """A socket of the attempt in progress: cancel() shuts it down (forget() when the attempt ends)."""
        with self._lock:
            self._sockets.append(sock)
            cancelled = self.cancelled
        if cancelled:
            _shutdown_quietly(sock)

    def forget(self) -> None:
        with self._lock:
            self._sockets.clear()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            sockets = list(self._sockets)
        try:
            self._w.send(b"x")
        except OSError:
            pass
        for sock in sockets:
            _shutdown_quietly(sock)

    def check(self) -> None:
        if self.cancelled:
            raise ConnectError("cancelled", "connection attempt cancelled (stopping)")

    def close(self) -> None:
        self._r.close()
        self._w.close()


@dataclass
class SSHSession:
    """An authenticated SSH connection; channels to the host's ports are opened through it."""

    host: HostConfig
    transport: AgentTransport
    sock: socket.socket | paramiko.Channel
    jump: "SSHSession | None"
    auth_method: str
    host_key: str
    handshake_seconds: float

    @property
    def active(self) -> bool:
        return self.transport.is_active()

    def open_channel(self, remote_host: str, remote_port: int, origin: tuple[str, int],
                     timeout: float) -> paramiko.Channel:
        """A direct-tcpip channel to remote_host:remote_port as seen from the host."""
        return self.transport.open_channel("direct-tcpip", (remote_host, remote_port), origin, timeout=timeout)

    def close(self) -> None:
        """Close the transport and wake its reader thread at once (shutdown, not just close)."""
        if isinstance(self.sock, socket.socket):
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.transport.close()
        if self.jump is not None:
            self.jump.close()

    def join(self, timeout: float = 2.0) -> None:
        self.transport.join(timeout)
        if self.jump is not None:
            self.jump.join(timeout)


def connect(host: HostConfig, identities: Identities, on_close: Callable[[], None] = lambda: None,
            jump_identities: Identities | None = None, cancel: Cancel | None = None) -> SSHSession:
    """Connect, check the host key, authenticate. Raise ConnectError with a reason and a fix.

    `cancel` (from another thread) aborts the attempt at once, whatever phase it is in.
    """
    started = time.monotonic()
    jump_session: SSHSession | None = None
    if host.jump is not None:
        jump_session = connect(host.jump, jump_identities or identities, cancel=cancel)
        sock: socket.socket | paramiko.Channel = _channel_through(jump_session, host)
    else:
        sock = _tcp_connect(host, cancel)
    transport: AgentTransport | None = None
    try:
        transport = AgentTransport(sock, on_close)
        _tune(transport, host)
        checker = HostKeyChecker(host.known_hosts_files, host.global_known_hosts_files,
                                 host.strict_host_key_checking)
        options = transport.get_security_options()
        options.key_types = checker.preferred_algorithms(host.hostname, host.port, options.key_types)
        try:
            transport.start_client(timeout=host.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectError("handshake", f"SSH handshake with {host.hostname}:{host.port} failed ({exc or 'eof'}): "
                               "is it an SSH server? check the port") from None
        key = transport.get_remote_server_key()
        checker.check(host.hostname, host.port, key)
        try:
            method = authenticate(transport, host.user, identities)
        except (paramiko.SSHException, EOFError, OSError) as exc:  # the host went away mid-authentication
            raise ConnectError("disconnected", f"connection to {host.hostname}:{host.port} lost during "
                               f"authentication ({exc or 'eof'})") from None
        if cancel is not None:
            cancel.check()
        if isinstance(sock, socket.socket):
            sock.settimeout(READER_WAKE_INTERVAL)
        return SSHSession(host, transport, sock, jump_session, method,
                          f"{key.get_name()}", time.monotonic() - started)
    except BaseException:
        if transport is not None:
            transport.close()
        _close_quietly(sock)
        if jump_session is not None:
            jump_session.close()
        raise


def _tune(transport: AgentTransport, host: HostConfig) -> None:
    options = transport.get_security_options()
    offered = options.ciphers
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in PREFERRED_CIPHERS)
    transport.name = f"ssh-{host.name}"
    transport.daemon = True


def _tcp_connect(host: HostConfig, cancel: Cancel | None = None) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host.hostname, host.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectError("dns", f"cannot resolve {host.hostname!r} ({exc.strerror}): check the name "
                           "or set HostName in ~/.ssh/config") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            _connect_cancellable(sock, address, host.connect_timeout, cancel)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(host.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if cancel is not None:
            cancel.track(sock)
        return sock
    target = f"{host.hostname}:{host.port}"
    if isinstance(last, ConnectionRefusedError):
        raise ConnectError("refused", f"connection to {target} refused: is sshd running there, on port {host.port}?")
    if isinstance(last, (socket.timeout, TimeoutError)):
        raise ConnectError("timeout", f"connection to {target} timed out after {host.connect_timeout:g}s: "
                           "check the network/firewall (ConnectTimeout to wait longer)")
    raise ConnectError("unreachable", f"cannot connect to {target}: {getattr(last, 'strerror', last)}")


def _connect_cancellable(sock: socket.socket, address: tuple, timeout: float, cancel: Cancel | None) -> None:
    """sock.connect(address) within `timeout`, returning early (ConnectError) if `cancel` fires."""
    if cancel is not None:
        cancel.check()
    sock.setblocking(False)
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_WRITE)
            if cancel is not None:
                selector.register(cancel, selectors.EVENT_READ)
            ready = selector.select(timeout)
        if cancel is not None:
            cancel.check()
        if not ready:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    sock.setblocking(True)


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _channel_through(jump: SSHSession, host: HostConfig) -> paramiko.Channel:
    try:
        return jump.open_channel(host.hostname, host.port, ("127.0.0.1", 0), timeout=host.connect_timeout)
    except paramiko.ChannelException as exc:
        jump.close()
        raise ConnectError("jump_refused", f"jump host {host.jump.hostname if host.jump else '?'} could not reach "
                           f"{host.hostname}:{host.port} ({exc.text}): check ProxyJump and the target "
                           "address") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        jump.close()
        raise ConnectError("jump_failed", f"jump host connection failed while opening "
                           f"{host.hostname}:{host.port}: {exc}") from None


def _close_quietly(sock: socket.socket | paramiko.Channel) -> None:
    try:
        sock.close()
    except OSError:
        pass
