"""A stand-in exporter for tests: serves /metrics of a chosen size on 127.0.0.1 (run inside a namespace).

Prints "ready" on stdout once bound, so the caller never sleeps to wait for it.
"""
from __future__ import annotations

import argparse
import http.server
import sys


def metrics_page(size: int, name: str) -> bytes:
    """A syntactically valid Prometheus text page of about `size` bytes."""
    lines = [f"# HELP {name}_sample A sample series.", f"# TYPE {name}_sample gauge"]
    total, i = 0, 0
    while total < size:
        line = f'{name}_sample{{series="{i:06d}",pad="abcdefghijklmnopqrstuvwxyz"}} {i}.5'
        lines.append(line)
        total += len(line) + 1
        i += 1
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--name", default="exporter")
    args = parser.parse_args()
    page = metrics_page(args.size, args.name)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = page if self.path.startswith("/metrics") else b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
