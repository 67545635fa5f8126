"""A fetch worker: reads JSON commands on stdin, answers one JSON line each (timing done here).

    {"op": "get", "port": 8000, "path": "/metrics", "keepalive": false, "timeout": 10}
      -> {"seconds": 0.0081, "bytes": 366012, "sha256": "...", "status": 200}
    {"op": "bulk", "port": 7000, "nbytes": 67108864, "timeout": 120}
      -> {"seconds": 0.41, "bytes": 67108864, "sha256": "..."}
Failures answer {"error": "..."}. "get" without keep-alive opens a fresh TCP connection per request
(Connection: close); with keep-alive one connection per port is kept and reused. Run it inside a
namespace (`ip netns exec`) to fetch "directly" from the host's own 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import json
import socket
import sys
import time

CHUNK = 262144
_conns: dict[int, socket.socket] = {}


def _read_response(sock: socket.socket, keep: bool) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response (Content-Length, or until EOF) and return (status, body)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(CHUNK)
        if not data:
            raise ConnectionError(f"connection closed before the headers ({len(buffer)} bytes)")
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    parts = [body]
    received = len(body)
    while length is None or received < length:
        data = sock.recv(CHUNK)
        if not data:
            if length is None and not keep:
                break
            raise ConnectionError(f"connection closed after {received} of {length} body bytes")
        parts.append(data)
        received += len(data)
    return status, b"".join(parts)


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(port: int, path: str, keepalive: bool, timeout: float) -> dict:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench\r\n"
               f"Connection: {'keep-alive' if keepalive else 'close'}\r\n\r\n").encode()
    started = time.perf_counter()
    sock = _conns.pop(port, None) if keepalive else None
    try:
        if sock is None:
            sock = _connect(port, timeout)
        sock.settimeout(timeout)
        sock.sendall(request)
        status, body = _read_response(sock, keepalive)
        seconds = time.perf_counter() - started
    except (OSError, ValueError, IndexError) as exc:
        if sock is not None:
            sock.close()
        return {"error": f"{type(exc).__name__}: {exc}"}
    if keepalive:
        _conns[port] = sock
    else:
        sock.close()
    return {"seconds": seconds, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "status": status}


def bulk(port: int, nbytes: int, timeout: float) -> dict:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    received = 0
    started = time.perf_counter()
    chunks: list[bytes] = []
    try:
        with _connect(port, timeout) as sock:
            sock.sendall(f"{nbytes}\n".encode())
            while received < nbytes:
                n = sock.recv_into(view)
                if not n:
                    break
                chunks.append(bytes(view[:n]))
                received += n
        seconds = time.perf_counter() - started
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "bytes": received}
    for chunk in chunks:  # hashed after the clock stopped
        digest.update(chunk)
    return {"seconds": seconds, "bytes": received, "sha256": digest.hexdigest()}


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "get":
            answer = get(**command)
        elif op == "bulk":
            answer = bulk(**command)
        else:
            answer = {"error": f"unknown op {op!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
