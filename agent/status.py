"""The live status an operator sees: per host and per forward, state, connections, last error.

On a terminal the table is redrawn in place once a second (only when something changed); otherwise
(journald, a pipe) each change is logged as one line, so logs stay greppable.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterable, TextIO

from .supervisor import HostTunnel

log = logging.getLogger(__name__)


def _age(timestamp: float) -> str:
    if not timestamp:
        return ""
    seconds = max(0, int(time.time() - timestamp))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def forward_state(tunnel: HostTunnel, name: str) -> str:
    """One word for a forward: down (no SSH), up, failing (probe or channel errors), listening."""
    stats = tunnel.forwards[name]
    if not stats.listening:
        return "closed"
    if tunnel.stats.state != "up":
        return "waiting"
    if stats.probe_ok is False:
        return "failing"
    if stats.probe_ok:
        return "up"
    return "ready"


def render(tunnels: Iterable[HostTunnel], width: int = 120) -> list[str]:
    """The status table as lines (also used by tests and by `--check`-style output)."""
    lines = []
    for tunnel in tunnels:
        s = tunnel.stats
        rtt = f"rtt {s.rtt * 1000:.1f}ms" if s.rtt is not None else ""
        extra = ""
        if s.state == "backoff":
            extra = f"retry in {max(0.0, s.retry_at - time.time()):.0f}s"
        head = f"{tunnel.host.name} ({tunnel.host.destination})  {s.state.upper()}  {rtt}  " \
               f"reconnects {s.reconnects_total}  {extra}"
        lines.append(head.rstrip()[:width])
        if s.last_error and s.state != "up":
            lines.append(f"  last error {_age(s.last_error_at)}: {s.last_error}"[:width])
        for name, f in tunnel.forwards.items():
            error = f"  {f.last_error} ({_age(f.last_error_at)})" if f.last_error else ""
            if f.probe_ok is False and f.probe_detail:
                error = f"  {f.probe_detail}"
            state = forward_state(tunnel, name)
            row = (f"  {name:<10} {f.forward.local:<21} -> {f.forward.remote:<21} {state:<8}"
                   f" conns {f.active:<3} in {_bytes(f.bytes_from_remote):>8}"
                   f" out {_bytes(f.bytes_to_remote):>8}{error}")
            lines.append(row[:width])
    return lines


class StatusDisplay:
    """Redraws the table on a TTY, or logs state changes otherwise."""

    def __init__(self, tunnels: Callable[[], Iterable[HostTunnel]], stream: TextIO | None = None,
                 header: str = "", interactive: bool | None = None) -> None:
        self._tunnels = tunnels
        self._stream = stream or sys.stderr
        self.header = header
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._stop = threading.Event()
        self._last: list[str] = []
        self._drawn = 0
        self._thread: threading.Thread | None = None
        self._seen: dict[str, str] = {}

    def start(self) -> None:
        if self._interactive:
            self._thread = threading.Thread(target=self._loop, name="status", daemon=True)
            self._thread.start()

    def changed(self, tunnel: HostTunnel) -> None:
        """Called by supervisors on a state change (non-interactive mode logs it)."""
        if self._interactive:
            return
        state = tunnel.stats.state
        if state == "up":
            seen = "up"
        elif state == "backoff":
            seen = f"down: {tunnel.stats.last_error}"  # retries of the same error are one line, not one each
        else:
            return
        if self._seen.get(tunnel.host.name) != seen:
            self._seen[tunnel.host.name] = seen
            if state == "up":
                log.info("%s: UP (%s)", tunnel.host.name, tunnel.stats.auth_method)
            else:
                log.info("%s: DOWN, retrying: %s", tunnel.host.name, tunnel.stats.last_error)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.draw()

    def draw(self) -> None:
        width = shutil.get_terminal_size((120, 24)).columns
        lines = ([self.header] if self.header else []) + render(self._tunnels(), width - 1)
        if lines == self._last:
            return
        out = self._stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the table's first line, clear below
        out.write("\n".join(lines) + "\n")
        out.flush()
        self._last, self._drawn = lines, len(lines)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self.draw()


def is_interactive(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM") != "dumb"
