"""`bench/run`: every benchmark in one run, one summary table on stdout, progress on stderr.

Runs as root (namespaces). Each benchmark gets its own Lab, closed before the next starts, so no
benchmark runs beside another's leftovers; Ctrl-C or SIGTERM stops at once and still removes every
namespace and process (a second Ctrl-C during clean-up is ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faults
import fleet
import latency
import report
import throughput
from lab import Lab, progress

BENCHMARKS = ("latency", "throughput", "faults", "fleet")
BINARIES = ("ip", "/usr/sbin/sshd", "ssh", "ssh-keygen", "autossh", "iptables")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (3 requests, 1 MiB, 5 hosts, no autossh blackhole): a smoke run, not a measure")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--requests", type=int, help="latency fetches per configuration (default 100; quick 3)")
    p.add_argument("--megabytes", type=float, help="throughput transfer size (default 64; quick 1)")
    p.add_argument("--rounds", type=int, help="throughput rounds (default 3; quick 1)")
    p.add_argument("--hosts", type=int, help="fleet hosts (default 50; quick 5)")
    p.add_argument("--idle", type=float, help="fleet idle window in seconds (default 30; quick 2)")
    p.add_argument("--blackhole-cap", type=float, default=150.0,
                   help="give up waiting for autossh to notice a blackhole after this many seconds (default 150)")
    p.add_argument("--json", type=Path, default=report.RESULTS / "latest.json",
                   help="write all results here (default bench/results/latest.json)")
    p.add_argument("--e2e-results", type=Path, default=report.E2E_RESULTS,
                   help="the end-to-end suite's fault-to-alert times (default bench/results/e2e.json)")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one, removed after)")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    q = args.quick
    args.requests = args.requests or (3 if q else 100)
    args.megabytes = args.megabytes or (1 if q else 64)
    args.rounds = args.rounds or (1 if q else 3)
    args.hosts = args.hosts or (5 if q else 50)
    args.idle = args.idle if args.idle is not None else (2.0 if q else 30.0)
    return args


def preflight() -> str | None:
    """Why the benchmarks cannot run here, or None."""
    if os.geteuid() != 0:
        return "bench/run needs root (it creates network namespaces): run it with sudo"
    missing = [b for b in BINARIES if not (shutil.which(b) or Path(b).exists())]
    if missing:
        return (f"bench/run needs {', '.join(missing)}: install the Debian packages of tests/debian-packages.txt "
                "(the README's test command does)")
    return None


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Clean-up must finish even if the operator presses Ctrl-C again."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_one(name: str, workdir: Path, body: Callable[[Lab], dict[str, Any]]) -> dict[str, Any]:
    started = time.monotonic()
    progress(f"{name}: starting")
    lab = Lab(workdir / name)
    try:
        result = body(lab)
    finally:
        with signals_ignored():
            lab.close()
    result["wall_seconds"] = time.monotonic() - started
    progress(f"{name}: done in {result['wall_seconds']:.0f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    problem = preflight()
    if problem:
        print(f"bench/run: error: {problem}", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    own_workdir = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    info = report.machine()
    progress(f"benchmarks {', '.join(args.only)} {'(quick)' if args.quick else ''} in {workdir}")
    bodies: dict[str, Callable[[Lab], dict[str, Any]]] = {
        "latency": lambda lab: latency.run(lab, requests=args.requests),
        "throughput": lambda lab: throughput.run(lab, megabytes=args.megabytes, rounds=args.rounds),
        "faults": lambda lab: faults.run(lab, quick=args.quick, blackhole_cap=args.blackhole_cap),
        "fleet": lambda lab: fleet.run(lab, hosts=args.hosts, namespaces=1 if args.quick else 5,
                                       idle_seconds=args.idle, settle_seconds=1 if args.quick else 5),
    }
    renders = {"latency": latency.render, "throughput": throughput.render, "faults": faults.render,
               "fleet": fleet.render}
    results: dict[str, Any] = {"machine": info, "quick": args.quick}
    try:
        for name in args.only:
            results[name] = run_one(name, workdir, bodies[name])
            print(renders[name](results[name]), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench/run: interrupted; everything it started has been stopped and removed", file=sys.stderr)
        return 130
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        e2e = report.load_e2e(args.e2e_results)
    except ValueError as exc:
        print(f"bench/run: warning: {exc}", file=sys.stderr)
        e2e = None
    results["e2e"] = e2e
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report.table(results, e2e, info))
    progress(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
