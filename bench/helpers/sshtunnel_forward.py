"""sshtunnel's SSHTunnelForwarder with its defaults, as its own process (the baseline of bench/latency.py).

    sshtunnel_forward.py HOST KEY LOCAL_PORT REMOTE_PORT
Forwards 127.0.0.1:LOCAL_PORT to the host's 127.0.0.1:REMOTE_PORT as user root; prints "ready"; runs
until SIGTERM. Only what a user must give is given (address, user, key, binds); everything else is
sshtunnel's default (Nagle on, no keepalive, paramiko's default cipher order).
"""
from __future__ import annotations

import signal
import sys
import threading

import sshtunnel


def main() -> None:
    host, key, local_port, remote_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    forwarder = sshtunnel.SSHTunnelForwarder(
        (host, 22), ssh_username="root", ssh_pkey=key,
        remote_bind_address=("127.0.0.1", remote_port), local_bind_address=("127.0.0.1", local_port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    forwarder.start()
    print("ready", flush=True)
    stop.wait()
    forwarder.stop()


if __name__ == "__main__":
    main()
