"""Bulk-transfer server for the throughput benchmark (run inside a namespace, on its 127.0.0.1).

A client sends "<nbytes>\n"; the server sends exactly nbytes of `pattern(nbytes)` and closes.
Prints "ready" once bound.
"""
from __future__ import annotations

import argparse
import hashlib
import socket
import socketserver
import sys

BLOCK = bytes(range(256)) * 256  # 64 KiB, so every byte position is checked by the digest


def pattern_digest(nbytes: int) -> str:
    """sha256 of the nbytes the server sends (what a byte-exact transfer must arrive as)."""
    digest = hashlib.sha256()
    full, rest = divmod(nbytes, len(BLOCK))
    for _ in range(full):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        nbytes = int(self.rfile.readline().strip() or 0)
        view = memoryview(BLOCK)
        full, rest = divmod(nbytes, len(BLOCK))
        for _ in range(full):
            self.connection.sendall(view)
        if rest:
            self.connection.sendall(view[:rest])
        self.connection.shutdown(socket.SHUT_WR)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
