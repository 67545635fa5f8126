"""An in-process SSH server for `--demo`: a throwaway "remote host" that the real agent connects to.

It accepts one client key, allows only direct-tcpip channels to 127.0.0.1 (like the restricted tunnel
account's PermitOpen), and maps each requested port to where the sample exporter really listens, so
the agent asks for exactly what it would ask a production host for (127.0.0.1:8000, ...).
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Mapping

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from .forward import _pump as pump  # the data path of the agent itself, run on the server side

log = logging.getLogger(__name__)


class _Policy(paramiko.ServerInterface):
    """Public-key auth for one key; direct-tcpip to mapped 127.0.0.1 ports only; nothing else."""

    def __init__(self, client_key: paramiko.PKey, ports: Mapping[int, int]) -> None:
        self._client_key = client_key
        self._ports = ports
        self.destinations: dict[int, int] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.asbytes() == self._client_key.asbytes():
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED  # no shell, no exec, no session

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        host, port = destination
        if host != "127.0.0.1" or port not in self._ports:
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.destinations[chanid] = self._ports[port]
        return OPEN_SUCCEEDED

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        return kind == "keepalive@openssh.com"


class DemoSSHServer:
    """Listens on 127.0.0.1:<ephemeral>; one paramiko server Transport per client connection."""

    def __init__(self, host_key: paramiko.PKey, client_key: paramiko.PKey, ports: Mapping[int, int]) -> None:
        self.host_key = host_key
        self._client_key = client_key
        self._ports = dict(ports)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._transports: list[paramiko.Transport] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="demo-sshd", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(sock,), name="demo-sshd-session", daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        transport = paramiko.Transport(sock)
        transport.daemon = True
        transport.add_server_key(self.host_key)
        policy = _Policy(self._client_key, self._ports)
        with self._lock:
            self._transports.append(transport)
        try:
            transport.start_server(server=policy)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.debug("demo sshd: handshake failed: %s", exc)
            return
        while transport.is_active() and not self._stopping:
            channel = transport.accept(timeout=1.0)
            if channel is None:
                continue
            port = policy.destinations.pop(channel.get_id(), None)
            if port is None:
                channel.close()
                continue
            threading.Thread(target=self._relay, args=(channel, port), name="demo-sshd-relay", daemon=True).start()

    @staticmethod
    def _relay(channel: paramiko.Channel, port: int) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            channel.close()
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            pump(upstream, channel)
        finally:
            channel.close()
            upstream.close()

    def close(self) -> None:
        self._stopping = True
        self._listener.close()
        with self._lock:
            transports, threads = list(self._transports), list(self._threads)
        for transport in transports:
            transport.close()
        self._thread.join(5)
        for thread in threads:
            thread.join(5)
