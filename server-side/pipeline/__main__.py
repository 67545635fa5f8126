"""Command line: `python -m pipeline {api,enqueue,loadgen,init-db}`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Reference pipeline (a stand-in for the Whisper pipeline).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="serve the HTTP API and /metrics on PIPELINE_API_ADDR (127.0.0.1:8000)")
    enqueue = sub.add_parser("enqueue", help="put N transcribe tasks on the queue directly")
    enqueue.add_argument("count", type=int)
    enqueue.add_argument("--audio-seconds", type=float, default=None)
    enqueue.add_argument("--failure-rate", type=float, default=None)
    load = sub.add_parser("loadgen", help="send a steady rate of API requests")
    load.add_argument("--url", default=None, help="API base URL (default http://PIPELINE_API_ADDR)")
    load.add_argument("--rate", type=float, default=5.0, help="requests per second")
    load.add_argument("--duration", type=float, default=60.0, help="seconds; 0 runs until SIGTERM")
    load.add_argument("--audio-seconds", type=float, default=None)
    sub.add_parser("init-db", help="create the results table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    conf = settings.load()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    if args.command == "api":
        from .api import serve
        serve(conf, ready=lambda line: print(line, flush=True))
    elif args.command == "enqueue":
        if args.count < 0:
            parser.error("count must be >= 0")
        from .tasks import enqueue as put
        ids = put(args.count, args.audio_seconds, args.failure_rate)
        print(f"enqueued {len(ids)}", flush=True)
    elif args.command == "loadgen":
        from .loadgen import run
        counts = run(args.url or f"http://{conf.api_addr}", args.rate, args.duration, args.audio_seconds)
        print(" ".join(f"{status}={n}" for status, n in sorted(counts.items())), flush=True)
    elif args.command == "init-db":
        from .db import ensure_schema
        ensure_schema(conf.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
