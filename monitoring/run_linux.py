#!/usr/bin/env python3
"""Run Debian's `prometheus` and `prometheus-alertmanager` on monitoring/'s own files, without Docker.

    monitoring/run-linux                                   # static fallback targets, agent on :9595
    monitoring/run-linux --sd-file ~/.local/state/tunnel/targets.json   # the agent's file_sd

Both listen on 127.0.0.1 only (Alertmanager's cluster port is off). The effective prometheus.yml and
alertmanager.yml are written to DATA/ by promconfig.py (addresses and paths only); the TSDB (90 days)
and Alertmanager's state live there too. Ctrl-C stops both. Tests use LinuxStack directly.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promconfig import alertmanager_config, prometheus_config, write_yaml

RETENTION = "90d"
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")


def find_binary(names: Sequence[str]) -> str:
    """The first of `names` on PATH; a one-line error naming the Debian package otherwise."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"{names[0]} not found: apt-get install prometheus prometheus-alertmanager")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG).

    The signal follows the *thread* that started the child: call start() from a thread that lives as long.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the runner's own stop() is all there is
        pass


class LinuxStack:
    """Prometheus (+ optionally Alertmanager) as child processes on 127.0.0.1, data under `data_dir`."""

    def __init__(self, data_dir: Path, *, prometheus_port: int = 9090, alertmanager_port: int | None = 9093,
                 sd_files: Sequence[Path] | None = None, agent: str = "127.0.0.1:9595",
                 rule_files: Sequence[Path] | None = None, webhook_url: str | None = None,
                 scrape_interval: str | None = None, evaluation_interval: str | None = None,
                 retention: str = RETENTION) -> None:
        self.data_dir = data_dir
        self.prometheus_port = prometheus_port
        self.alertmanager_port = alertmanager_port
        self.retention = retention
        self.prometheus_yml = write_yaml(prometheus_config(
            sd_files=sd_files, agent=agent, rule_files=rule_files, scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
            alertmanager=f"127.0.0.1:{alertmanager_port}" if alertmanager_port else None), data_dir / "prometheus.yml")
        if not alertmanager_port:  # no Alertmanager: do not let Prometheus send to a default one
            document = prometheus_config(src=self.prometheus_yml)
            document.pop("alerting", None)
            write_yaml(document, self.prometheus_yml)
        self.alertmanager_yml = write_yaml(alertmanager_config(webhook_url=webhook_url), data_dir / "alertmanager.yml")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def prometheus_command(self) -> list[str]:
        return [find_binary(PROMETHEUS_BINARIES), f"--config.file={self.prometheus_yml}",
                f"--storage.tsdb.path={self.data_dir / 'tsdb'}", f"--storage.tsdb.retention.time={self.retention}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--web.enable-lifecycle"]

    def alertmanager_command(self) -> list[str]:
        return [find_binary(ALERTMANAGER_BINARIES), f"--config.file={self.alertmanager_yml}",
                f"--storage.path={self.data_dir / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address="]

    def start(self, timeout: float = 30.0, prometheus: bool = True) -> None:
        """Start both (Alertmanager alone with prometheus=False) and wait until they answer /-/ready."""
        commands = [(self.prometheus_command(), self.prometheus_url)] if prometheus else []
        if self.alertmanager_port:
            commands.append((self.alertmanager_command(), self.alertmanager_url))
        for command, url in commands:
            with open(self.data_dir / f"{Path(command[0]).name}.log", "wb") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))  # noqa: PLW1509
            self._wait_ready(self.procs[-1], url, timeout)

    def _wait_ready(self, proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{self._name(proc)} exited with {proc.returncode}: {self.log(proc)[-1500:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {self.log(proc)[-1500:]}")
            time.sleep(0.1)

    @staticmethod
    def _name(proc: subprocess.Popen[bytes]) -> str:
        args = proc.args
        return Path(str(args[0] if isinstance(args, (list, tuple)) else args)).name

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        path = self.data_dir / f"{self._name(proc)}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, expr: str) -> list[dict]:
        """An instant query against this Prometheus; the result vector."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["result"]

    def stop(self) -> None:
        """SIGTERM each process (then SIGKILL after 10 s)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> LinuxStack:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run-linux", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-file", type=Path, action="append",
                        help="the agent's --sd-file (default: monitoring/targets/*.json, the static fallback)")
    parser.add_argument("--agent", default="127.0.0.1:9595", help="the agent's --metrics address")
    parser.add_argument("--data", type=Path, default=Path(os.path.expanduser("~/.local/share/tunnel-monitoring")),
                        help="TSDB, Alertmanager state and the effective configs (default %(default)s)")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--webhook", help="Alertmanager webhook URL (default: alertmanager.yml's)")
    args = parser.parse_args(argv)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop is Ctrl-C
    try:
        stack = LinuxStack(args.data, prometheus_port=args.prometheus_port, alertmanager_port=args.alertmanager_port,
                           sd_files=args.sd_file, agent=args.agent, webhook_url=args.webhook)
    except OSError as exc:
        print(f"run-linux: error: cannot write the configs in {args.data}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        stack.start()
        print(f"Prometheus {stack.prometheus_url}  Alertmanager {stack.alertmanager_url}  (data {args.data}); "
              "Ctrl-C stops", flush=True)
        while all(p.poll() is None for p in stack.procs):
            time.sleep(1)
        print(f"run-linux: error: a process exited; see the logs in {args.data}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"run-linux: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean stop short
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
