"""The end-to-end lab (a helper, not a test file): a production host in a namespace, the operator's
laptop in the test's namespace.

Production side (a RemoteHost): sshd with the restricted `tunnel` account (server-side/sshd), Redis,
PostgreSQL, the reference API under load, two Celery workers, Flower and both exporters, all on the
namespace's own 127.0.0.1 (tests/pipeline_host.py). Operator side: the real CLI `python tunnel.py
--config hosts.yml` as user `tunnel`, Debian's Prometheus and Alertmanager started from monitoring/'s own
files (monitoring/run_linux.LinuxStack), and a webhook receiver that records every notification.

The one documented transform for speed (TIME_SCALE): every duration of the production rule files
(`for:` and range windows) and of alertmanager.yml's routes (group_wait, group_interval,
repeat_interval), both by monitoring/scale_rules.py, is multiplied by TIME_SCALE; Prometheus scrapes
every 3 s and evaluates every second, and the agent probes every 3 s. Expressions, thresholds, labels,
routes and inhibitions are the production ones. `production_lab` runs the same chain with nothing scaled.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent_process import AgentProcess, free_port
from alert_webhook import WebhookReceiver
from pipeline_host import BINARIES as PIPELINE_BINARIES
from pipeline_host import PipelineHost
from remote_host import RemoteHost, wait_until

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
sys.path.insert(0, str(MONITORING))
from promconfig import alertmanager_config, write_yaml  # noqa: E402
from run_linux import LinuxStack  # noqa: E402
from scale_rules import parse_duration, scale_alertmanager, scale_files  # noqa: E402

TIME_SCALE = 0.05  # production durations x 0.05: for: 1m -> 3s, [5m] -> 15s, group_wait 30s -> 1.5s
# postgres_exporter takes ~1 s per scrape, one at a time, while PostgreSQL is down: scrapes (and the
# agent's probes) every 3 s leave it idle half the time instead of queueing requests without end
SCRAPE_INTERVAL = "3s"
PROBE_INTERVAL = 3
MIN_RANGE = "12s"  # a rate window holds at least four scrapes
HOST = "prod-1"
FORWARDS = (("api", 8000), ("flower", 5555), ("postgres", 9187), ("redis", 9121))  # a Linux host: no windows
BINARIES = ("ip", "/usr/sbin/sshd", "ssh-keygen", "iptables", "prometheus", "prometheus-alertmanager",
            "useradd", *PIPELINE_BINARIES)
RESULTS = ROOT / "bench" / "results" / "e2e.json"
#: every measured fault -> notification row of this run, written to RESULTS when the lab host closes
RESULT_ROWS: list[dict[str, Any]] = []


def write_results() -> None:
    """bench/results/e2e.json (format: bench/README.md), read by bench/run."""
    if RESULT_ROWS:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"time_scale": TIME_SCALE, "date": time.strftime("%Y-%m-%d %H:%M"),
                                       "alerts": RESULT_ROWS}, indent=2) + "\n")


@dataclass
class Lab:
    """Everything of one end-to-end chain, and the fault-to-notification times measured on it."""

    host: RemoteHost
    pipe: PipelineHost
    agent: AgentProcess
    stack: LinuxStack
    webhook: WebhookReceiver
    time_scale: float
    fixed_at: float = 0.0

    def firing_alerts(self) -> list[dict[str, str]]:
        """Labels of every alert Prometheus has firing now."""
        return [r["metric"] for r in self.stack.query('ALERTS{alertstate="firing"}')]

    def longest_group_interval(self) -> float:
        """Seconds: the longest group_interval of any route in the running Alertmanager config."""
        document = yaml.safe_load(self.stack.alertmanager_yml.read_text())
        routes, found = [(document["route"], "5m")], []  # 5m: Alertmanager's default at the root
        while routes:
            route, inherited = routes.pop()
            interval = str(route.get("group_interval", inherited))  # a child route inherits its parent's
            found.append(parse_duration(interval))
            routes.extend((child, interval) for child in route.get("routes", []))
        return max(found) / 1000

    def fixed(self) -> None:
        """Mark the moment the current fault is undone (resolved times are measured from here)."""
        self.fixed_at = time.monotonic()

    def record(self, fault: str, alert: str, fault_at: float, fired_at: float, resolved_at: float | None,
               seed: str = "") -> None:
        """One row of bench/results/e2e.json: fault -> notification, and fault undone -> resolved."""
        row: dict[str, Any] = {"fault": fault, "alert": alert, "fired_seconds": round(fired_at - fault_at, 2)}
        if resolved_at is not None:
            row["resolved_seconds"] = round(resolved_at - self.fixed_at, 2)
        if seed:
            row["seed"] = seed
        RESULT_ROWS.append(row)
        print(f"\n[e2e] {fault}: {alert} notified after {row['fired_seconds']} s"
              + (f", resolved {row['resolved_seconds']} s after it was undone" if resolved_at is not None else "")
              + f" (time scale {self.time_scale:g})")

def _agent_config(path: Path, host: RemoteHost, pipe: PipelineHost, sd_file: Path, probe_interval: float | None,
                  known_hosts: Path) -> Path:
    """The operator's fleet file for this host: the restricted account, Flower's credentials from env."""
    document: dict[str, Any] = {
        "sd_file": str(sd_file),
        "hosts": [{
            "name": HOST,
            "ssh": f"tunnel@{host.addr}",
            "identity_file": str(host.client_key),
            "identities_only": True,
            "known_hosts": str(known_hosts),
            "labels": {"env": "e2e"},
            "flower_auth": {"username": pipe.flower_auth[0], "password_env": "E2E_FLOWER_PASSWORD"},
            "forwards": [{"name": name, "remote_port": port, "local_port": free_port()} for name, port in FORWARDS],
        }],
    }
    if probe_interval is not None:
        document["probe_interval"] = probe_interval
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_chain(exits: ExitStack, workdir: Path, host: RemoteHost, pipe: PipelineHost, scale: float) -> Lab:
    """Agent, Prometheus, Alertmanager and the webhook for `host`, durations multiplied by `scale`."""
    workdir.mkdir(parents=True, exist_ok=True)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(host.known_hosts_line())
    sd_file = workdir / "targets.json"
    fast = scale < 1
    config = _agent_config(workdir / "hosts.yml", host, pipe, sd_file, PROBE_INTERVAL if fast else None, known_hosts)
    agent = AgentProcess(["-q", "-F", "none", "--config", str(config)], workdir,
                         env={"E2E_FLOWER_PASSWORD": pipe.flower_auth[1]})
    exits.callback(agent.stop)
    webhook = WebhookReceiver()
    exits.callback(webhook.close)

    rules = sorted((MONITORING / "rules").glob("*.yml"))
    if fast:
        rules = scale_files(rules, workdir / "rules", scale, min_range_ms=int(MIN_RANGE[:-1]) * 1000)
    stack = LinuxStack(workdir / "monitoring", prometheus_port=free_port(), alertmanager_port=free_port(),
                       sd_files=[sd_file], agent=f"127.0.0.1:{agent.metrics_port}", rule_files=rules,
                       webhook_url=webhook.url, scrape_interval=SCRAPE_INTERVAL if fast else None,
                       evaluation_interval="1s" if fast else None)
    if fast:
        write_yaml(scale_alertmanager(alertmanager_config(webhook_url=webhook.url), scale), stack.alertmanager_yml)
    exits.callback(stack.stop)
    wait_until(sd_file.exists, 60, "the agent's file_sd")
    stack.start()
    return Lab(host, pipe, agent, stack, webhook, scale)


def all_up(lab: Lab) -> bool:
    """Every scrape target (the forwards and the agent itself) is up in Prometheus."""
    ups = lab.stack.query("up")
    jobs = {r["metric"].get("job") for r in ups if r["value"][1] == "1"}
    return {"tunnel", *(name for name, _ in FORWARDS)} <= jobs and all(r["value"][1] == "1" for r in ups)
