"""Every dashboard panel's query, and every alert rule, evaluated by a real Prometheus on real data.

Production side: the reference pipeline (tests/pipeline_host.PipelineHost: Redis, PostgreSQL, the API,
two Celery workers, Flower, redis_exporter, postgres_exporter) on a namespace host's 127.0.0.1, behind a
real sshd. Operator side: the real agent (`python tunnel.py --config ... --sd-file ...`) and Debian's
`prometheus`, started by monitoring/run_linux.LinuxStack from monitoring/prometheus.yml and
monitoring/rules with the documented test override (monitoring/promconfig.py: the agent's file_sd and
/metrics address, a free port, a tmp TSDB, scrape and evaluation every 1 s).

The report of docs/ is rendered from this data (otherwise it goes to the test's tmp dir):

    DASHBOARD_REPORT=docs/dashboard-report.png DASHBOARD_REPORT_MINUTES=4 pytest tests/test_dashboards_live.py

With DASHBOARD_REPORT_MINUTES the test keeps collecting that long, and half-way enqueues a burst of 150
tasks, so the report shows the queue move (and the worker count drop of the WorkerDown check).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from agent_process import ROOT, AgentProcess, free_port
from remote_host import RemoteHost, require, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MONITORING = ROOT / "monitoring"
FORWARDS = {"api": 8000, "flower": 5555, "postgres": 9187, "redis": 9121}  # a Linux host: no windows_exporter
HOST = "prod-1"
SCRAPE = 1.0  # seconds, the test override of the 15 s production interval


def load(name: str) -> ModuleType:
    """A module of monitoring/ (plain scripts, not a package)."""
    if str(MONITORING) not in sys.path:
        sys.path.insert(0, str(MONITORING))
    return importlib.import_module(name)


run_linux = load("run_linux")
report = load("render_report")


def api(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Any, Any, AgentProcess]]:
    """(pipeline, Prometheus stack, agent), all running and scraping through the tunnel."""
    from pipeline_host import BINARIES, PipelineHost

    require(["ip", "/usr/sbin/sshd", "ssh-keygen", "iptables", "prometheus", *BINARIES])
    with RemoteHost(tmp_path / "host") as host:
        host.start_sshd()
        with PipelineHost(host, workers=2, task_seconds=0.05, task_failure_rate=0.2, api_error_rate=0.1) as pipe:
            pipe.start_load(rate=8, audio_seconds=0.05)
            password = tmp_path / "flower.pass"
            password.write_text(pipe.flower_auth[1])
            password.chmod(0o600)
            known = tmp_path / "known_hosts"
            known.write_text(host.known_hosts_line())
            sd_file = tmp_path / "sd" / "targets.json"
            forwards = ", ".join(f"{{name: {n}, remote_port: {p}, local_port: {free_port()}}}"
                                 for n, p in FORWARDS.items())
            config = tmp_path / "hosts.yml"
            config.write_text(
                "probe_interval: 1\nhosts:\n"
                f"  - {{name: {HOST}, ssh: root@{host.addr}, identity_file: {host.client_key}, known_hosts: {known},"
                f" identities_only: true, server_alive_interval: 1, labels: {{env: test}},"
                f" flower_auth: {{username: {pipe.flower_auth[0]}, password_file: {password}}},"
                f" forwards: [{forwards}]}}\n")
            with AgentProcess(["-q", "--config", str(config), "--sd-file", str(sd_file)], tmp_path) as agent:
                agent.wait_up(30)
                wait_until(sd_file.exists, 10, "the agent's file_sd")
                stack = run_linux.LinuxStack(
                    tmp_path / "prometheus", prometheus_port=free_port(), alertmanager_port=None,
                    sd_files=[sd_file], agent=f"127.0.0.1:{agent.metrics_port}",
                    scrape_interval=f"{SCRAPE:g}s", evaluation_interval=f"{SCRAPE:g}s")
                with stack:
                    yield pipe, stack, agent
                assert agent.stop() == 0, agent.output()[-2000:]


def data_span(url: str) -> float:
    """About how many seconds of data Prometheus holds (samples of tunnel_up x the scrape interval)."""
    result = api(url, "/api/v1/query", query=f'count_over_time(tunnel_up{{host="{HOST}"}}[1h]) * {SCRAPE}')["result"]
    return float(result[0]["value"][1]) if result else 0.0


def wait_for_data(url: str, seconds: float, interval: float) -> None:
    wait_until(lambda: data_span(url) >= seconds, seconds + 60, f"{seconds:.0f} s of data", interval=interval)


def test_every_panel_query_returns_real_data_through_the_tunnel(live: tuple[Any, Any, AgentProcess]) -> None:
    pipe, stack, _agent = live
    url = stack.prometheus_url

    # Targets come from the agent's file_sd: each job keeps its own, labelled with the production host.
    def targets_up() -> list[dict[str, Any]] | None:
        active = api(url, "/api/v1/targets", state="active")["activeTargets"]
        healthy = [t for t in active if t["health"] == "up"]
        return active if len(healthy) == len(FORWARDS) + 1 else None
    active = wait_until(targets_up, 30, "every target up (api, flower, postgres, redis, tunnel)")
    by_job = {t["labels"]["job"]: t["labels"] for t in active}  # type: ignore[union-attr]
    assert set(by_job) == {*FORWARDS, "tunnel"}
    for job, port in FORWARDS.items():
        assert by_job[job]["instance"] == f"{HOST}:{port}" and by_job[job]["host"] == HOST, by_job[job]
    assert "host" not in by_job["tunnel"], "the agent's own samples carry host; the target must not"

    # The $host variable, evaluated as Grafana does (label_values(<match>, host)).
    dashboard = report.load_dashboard()
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "host")
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
    assert match, variable["query"]
    assert api(url, f"/api/v1/label/{match.group(2)}/values", **{"match[]": match.group(1)}) == [HOST]

    # Every panel's every target, $host and Grafana's macros substituted, parses and returns data.
    window = 300.0
    variables = {"host": HOST, **report.macros(window, SCRAPE, SCRAPE)}
    queries = report.panel_queries(dashboard, variables)
    assert len({q.panel for q in queries}) == 13 and "$" not in "".join(q.expr for q in queries)
    prom = report.Prometheus(url)
    empty: dict[str, str] = {}

    def all_have_data() -> bool:
        now = time.time()
        empty.clear()
        for q in queries:
            series = report.fetch(prom, q, now - window, now, SCRAPE)  # raises on a parse error
            if not series or all(math.isnan(v) for s in series for v in s.values):  # none, or only NaN
                empty[f"{q.panel}/{q.ref}"] = q.expr
        return not empty
    try:
        wait_until(all_have_data, 90, "data for every panel query", interval=1.0)
    except TimeoutError:
        pytest.fail(f"panels without data after 90 s: {empty}")

    # The values mean what the panels say: 2 workers online, tunnel and forwards up, the queue known.
    assert api(url, "/api/v1/query", query=f'celery_workers_online{{host="{HOST}"}}')["result"][0]["value"][1] == "2"
    forward_up = api(url, "/api/v1/query", query=f'tunnel_forward_up{{host="{HOST}"}}')["result"]
    assert {r["metric"]["forward"]: r["value"][1] for r in forward_up} == {f: "1" for f in FORWARDS}
    assert api(url, "/api/v1/query", query='redis_key_size{key="celery"}')["result"], "queue depth not exported"

    # Every alert rule evaluates without error on this data (wrong label or function: health "err").
    groups = api(url, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 13
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [a["labels"]["alertname"] for a in api(url, "/api/v1/alerts")["alerts"]]
    assert "TunnelDown" not in firing and "NoWorkersOnline" not in firing and "WorkerDown" not in firing, firing

    # The production rules on this data: kill -9 one worker of two -> WorkerDown for that worker (for: 15s),
    # and not NoWorkersOnline. The seed's flower_worker_online would still say 1 for it.
    victim = pipe.worker_names[0]
    killed = time.monotonic()
    pipe.kill_worker(victim)

    def worker_down_firing() -> list[dict[str, Any]]:
        return [a for a in api(url, "/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "WorkerDown" and a["state"] == "firing"]
    firing_alerts = wait_until(worker_down_firing, 60, f"WorkerDown firing for {victim}", interval=0.5)
    print(f"\nFIGURE kill -9 to WorkerDown firing in Prometheus (for: 15s, 1 s scrapes): "
          f"{time.monotonic() - killed:.1f} s", flush=True)
    assert [(a["labels"]["host"], a["labels"]["worker"], a["labels"]["severity"]) for a in firing_alerts] == \
        [(HOST, victim, "warning")]  # type: ignore[union-attr]
    names = {a["labels"]["alertname"] for a in api(url, "/api/v1/alerts")["alerts"]}
    assert "NoWorkersOnline" not in names and "TunnelDown" not in names, names
    flower = api(url, "/api/v1/query", query=f'flower_worker_online{{host="{HOST}", worker="{victim}"}}')["result"]
    assert [r["value"][1] for r in flower] == ["1"], flower  # the seed's signal never drops on kill -9

    # A person's view of the same data: the report renderer draws every panel.
    out = Path(os.environ.get("DASHBOARD_REPORT") or stack.data_dir / "dashboard-report.png")
    if not out.is_absolute():
        out = ROOT / out
    minutes = float(os.environ.get("DASHBOARD_REPORT_MINUTES") or 0)
    if minutes:
        wait_for_data(url, minutes * 30, interval=5.0)
        pipe.enqueue(150, audio_seconds=0.05)
        wait_for_data(url, minutes * 60, interval=5.0)
    panels, start, end = report.collect(prom, dashboard, HOST, data_span(url) / 60, SCRAPE)
    report.render(panels, out, f"Pipeline Overview - {HOST} (live test: reference pipeline through the tunnel)",
                  start, end)
    assert out.stat().st_size > 20_000, "the report PNG is suspiciously small"
    assert all(series for _, series in panels), [q.panel for q, s in panels if not s]
