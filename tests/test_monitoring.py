"""monitoring/ checked by its own tools: promtool (config, rules, rule unit tests), amtool, a real
Alertmanager for the inhibition, plus the static promises of the compose files, the Grafana provisioning
and the dashboard. Fast (no pipeline): the live data checks are in test_dashboards_live.py.
"""
from __future__ import annotations

import http.server
import importlib
import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from agent_process import ROOT, free_port
from remote_host import require, wait_until

MONITORING = ROOT / "monitoring"
RULES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "rules" / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "dashboards" / "pipeline-overview.json"
COMPOSE_FILES = [MONITORING / "docker-compose.yml", MONITORING / "docker-compose.desktop.yml"]
FORWARD_PORTS = {"api": 8000, "flower": 5555, "postgres": 9187, "redis": 9121, "windows": 9182}
RUNBOOK_BASE = "https://github.com/example/tunnel/blob/main/docs/runbooks/"

if str(MONITORING) not in sys.path:
    sys.path.insert(0, str(MONITORING))
scale_rules = importlib.import_module("scale_rules")
promconfig = importlib.import_module("promconfig")
render_report = importlib.import_module("render_report")
run_linux = importlib.import_module("run_linux")


def contract_alerts() -> list[str]:
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Alert names", 1)[1]
    return re.findall(r"[A-Z][A-Za-z]+", section.split("\n\n")[1].split(".")[0])


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}


def run(cmd: list[str], cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout[-3000:]} {result.stderr[-3000:]}"
    return result


# -- Prometheus ----------------------------------------------------------------------------------------

def test_promtool_check_config_and_rules() -> None:
    require(["promtool"])
    out = run(["promtool", "check", "config", "prometheus.yml"]).stdout
    assert "SUCCESS: 3 rule files found" in out and "WARNING" not in out, out
    run(["promtool", "check", "rules", *map(str, RULES)])


def test_promtool_rule_unit_tests() -> None:
    require(["promtool"])
    out = run(["promtool", "test", "rules", *map(str, RULE_TESTS)]).stdout
    assert out.count("SUCCESS") == len(RULE_TESTS) == 3, out


def test_prometheus_jobs_interval_and_file_sd() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s" and config["global"]["evaluation_interval"] == "15s"
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {*FORWARD_PORTS, "tunnel"}
    for name in FORWARD_PORTS:  # every forward job reads the same file_sd and keeps its own entries
        assert jobs[name]["file_sd_configs"][0]["files"] == ["targets/*.json"]
        assert jobs[name]["relabel_configs"] == [{"source_labels": ["job"], "regex": name, "action": "keep"}]
    tunnel = jobs["tunnel"]["static_configs"][0]
    assert tunnel["targets"] == ["127.0.0.1:9595"] and "host" not in tunnel.get("labels", {})
    # the committed static fallback: the five default forwards, labelled as the agent's file_sd would
    fallback = json.loads((MONITORING / "targets" / "single-host.json").read_text())
    assert {e["labels"]["job"]: e["targets"] for e in fallback} == {j: [f"127.0.0.1:{p}"] for j, p in FORWARD_PORTS.items()}
    for entry in fallback:
        port = FORWARD_PORTS[entry["labels"]["job"]]
        assert entry["labels"]["instance"] == f"{entry['labels']['host']}:{port}"


def test_agent_file_sd_entries_are_each_kept_by_their_job(tmp_path: Path) -> None:
    """The agent's own file_sd output, through Prometheus' own relabelling (promtool check config is not
    enough: a wrong regex keeps nothing). Uses Debian's prometheus with the targets API, no scraping."""
    require(["prometheus"])
    from agent.config import AgentConfig, default_forwards
    from agent.discovery import write_file_sd
    from agent.sshconfig import load_ssh_config, resolve_host

    host = resolve_host("deploy@prod-9", load_ssh_config("none"), options={}, forwards=default_forwards())
    sd = tmp_path / "sd" / "targets.json"
    write_file_sd(sd, AgentConfig(hosts=(host,)))
    stack = run_linux.LinuxStack(tmp_path / "prom", prometheus_port=free_port(), alertmanager_port=None,
                                 sd_files=[sd], agent="127.0.0.1:1", scrape_interval="1h")
    with stack:
        def targets() -> list[dict[str, Any]] | None:
            with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/targets", timeout=5) as response:
                active = json.load(response)["data"]["activeTargets"]
            return active if len(active) == 6 else None
        active = wait_until(targets, 20, "6 targets from the agent's file_sd")
    labels = {t["labels"]["job"]: t["labels"] for t in active}  # type: ignore[attr-defined,union-attr]
    assert set(labels) == {*FORWARD_PORTS, "tunnel"}
    for job, port in FORWARD_PORTS.items():
        assert labels[job]["instance"] == f"prod-9:{port}" and labels[job]["host"] == "prod-9"


def test_promconfig_override_changes_only_addresses_paths_intervals(tmp_path: Path) -> None:
    require(["promtool"])
    original = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    sd = tmp_path / "agent.json"
    sd.write_text("[]")
    effective = promconfig.prometheus_config(sd_files=[sd], agent="127.0.0.1:19595", alertmanager="127.0.0.1:19093",
                                             scrape_interval="1s", evaluation_interval="1s")
    path = promconfig.write_yaml(effective, tmp_path / "prometheus.yml")
    run(["promtool", "check", "config", str(path)], cwd=tmp_path)
    assert effective["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    assert effective["rule_files"] == [str(MONITORING / "rules" / "*.yml")]
    assert effective["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:19093"]}]
    for before, after in zip(original["scrape_configs"], effective["scrape_configs"]):
        assert before["job_name"] == after["job_name"]
        assert before.get("relabel_configs") == after.get("relabel_configs")
        if "file_sd_configs" in before:
            assert after["file_sd_configs"][0]["files"] == [str(sd)]
        else:
            assert after["static_configs"][0]["targets"] == ["127.0.0.1:19595"]


def test_linux_runner_starts_both_on_loopback(tmp_path: Path) -> None:
    require(["prometheus", "prometheus-alertmanager"])
    stack = run_linux.LinuxStack(tmp_path, prometheus_port=free_port(), alertmanager_port=free_port(),
                                 scrape_interval="1s")
    assert "--storage.tsdb.retention.time=90d" in stack.prometheus_command()
    assert "--cluster.listen-address=" in stack.alertmanager_command()  # no gossip port on 0.0.0.0:9094
    with stack:
        def alertmanager_known() -> bool:
            with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/alertmanagers", timeout=5) as response:
                active = json.load(response)["data"]["activeAlertmanagers"]
            return [a["url"] for a in active] == [f"{stack.alertmanager_url}/api/v2/alerts"]
        wait_until(alertmanager_known, 20, "Prometheus to know the runner's Alertmanager")
        # the static fallback's five targets and the agent's job are scraped (nothing answers: up == 0)
        wait_until(lambda: stack.query("count(up)") and stack.query("count(up)")[0]["value"][1] == "6", 20,
                   "6 targets scraped")
        listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
        for proc in stack.procs:
            mine = [line.split()[3] for line in listening.splitlines() if f"pid={proc.pid}," in line]
            assert mine and all(addr.startswith("127.0.0.1:") for addr in mine), mine


# -- alert rules ---------------------------------------------------------------------------------------

def test_rules_are_the_contract_names_with_labels_and_annotations() -> None:
    rules = alert_rules()
    assert sorted(rules) == sorted(contract_alerts()) and len(rules) == 13
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}{name}.md", name
        runbook = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert runbook.exists(), runbook
        assert runbook.read_text().startswith(f"# {name}"), runbook
        assert rule["expr"].strip() in runbook.read_text(), f"{runbook}: the expression differs from the rule's"
        assert "by (host" in rule["expr"], f"{name}: every alert must end with a host label"


def test_rules_use_the_real_signals() -> None:
    rules = alert_rules()
    assert 'redis_key_size{job="redis", key="celery"}' in rules["HighQueueDepth"]["expr"]
    assert "task-received" not in rules["HighQueueDepth"]["expr"]
    assert "celery_workers_online" in rules["NoWorkersOnline"]["expr"]
    assert "celery_worker_up" in rules["WorkerDown"]["expr"]
    error = rules["HighAPIErrorRate"]["expr"]
    assert error.count("sum by (host)") == 2 and "> 0)" in error  # ratio of sums, zero denominator dropped
    assert "histogram_quantile(0.95" in rules["APILatencyHigh"]["expr"] and "by (host, le)" in rules["APILatencyHigh"]["expr"]
    assert "tunnel_up" in rules["TunnelDown"]["expr"] and "tunnel_forward_up" in rules["ForwardDown"]["expr"]
    assert "tunnel_reconnects_total" in rules["TunnelFlapping"]["expr"]
    assert "up{" in rules["ExporterScrapeFailing"]["expr"] and "== 0" in rules["ExporterScrapeFailing"]["expr"]


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    firing: dict[str, list[dict[str, Any]]] = {}
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    firing.setdefault(check["alertname"], []).extend(check["exp_alerts"])
                else:
                    quiet.add(check["alertname"])
    names = set(alert_rules())
    assert set(firing) == names and quiet == names
    for name, alerts in firing.items():
        for alert in alerts:
            assert {"severity", "host"} <= set(alert["exp_labels"]), name
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, name


# -- the duration transform for tests (issue 8) --------------------------------------------------------

def test_scale_rules_durations() -> None:
    assert scale_rules.parse_duration("1m30s") == 90_000 and scale_rules.format_duration(90_000) == "1m30s"
    assert scale_rules.format_duration(750) == "750ms" and scale_rules.format_duration(0) == "0s"
    with pytest.raises(ValueError):
        scale_rules.parse_duration("5 minutes")
    expr = 'rate(a[5m]) / rate(b{le="1"}[1h]) + max_over_time(c[10m:1m]) + d[5m:]'
    assert scale_rules.scale_expr(expr, 0.1) == 'rate(a[30s]) / rate(b{le="1"}[6m]) + max_over_time(c[1m:6s]) + d[30s:]'
    assert scale_rules.scale_expr("rate(a[5m])", 0.01, min_range_ms=4000) == "rate(a[4s])"
    assert scale_rules.scale_expr(expr, 1) == expr


def test_scale_alertmanager_scales_every_route_and_keeps_the_rest() -> None:
    document = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    scaled = scale_rules.scale_alertmanager(document, 0.05)
    assert scaled["route"]["group_wait"] == "1s500ms" and scaled["route"]["group_interval"] == "15s"
    critical = next(r for r in scaled["route"]["routes"] if r["receiver"] == "critical")
    assert critical["group_wait"] == "500ms"
    assert scaled["inhibit_rules"] == document["inhibit_rules"] and scaled["receivers"] == document["receivers"]
    matchers = [r.get("matchers") for r in document["route"]["routes"]]
    assert [r.get("matchers") for r in scaled["route"]["routes"]] == matchers


def test_scale_rules_files_are_valid_and_change_only_durations(tmp_path: Path) -> None:
    require(["promtool"])
    written = scale_rules.scale_files(RULES, tmp_path, 0.05, min_range_ms=4000)
    run(["promtool", "check", "rules", *map(str, written)])
    scaled = {r["alert"]: r for p in written for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]}
    for name, rule in alert_rules().items():
        other = scaled[name]
        assert {k: v for k, v in rule.items() if k not in ("for", "expr")} == \
               {k: v for k, v in other.items() if k not in ("for", "expr")}, name
        assert re.sub(r"\[[^\]]*\]", "[]", rule["expr"]) == re.sub(r"\[[^\]]*\]", "[]", other["expr"]), name
    assert scaled["HighQueueDepth"]["for"] == "30s" and scaled["TunnelDown"]["for"] == "3s"
    assert "[15s]" in scaled["HighAPIErrorRate"]["expr"] and "[45s]" in scaled["TunnelFlapping"]["expr"]


def test_scaled_rule_fires_at_the_scaled_time(tmp_path: Path) -> None:
    """The transform keeps the rule's behaviour: HighQueueDepth (for 10m) fires after 30 s at factor 0.05."""
    require(["promtool"])
    scale_rules.scale_files([MONITORING / "rules" / "pipeline.yml"], tmp_path, 0.05)
    case = {"rule_files": ["pipeline.yml"], "evaluation_interval": "5s", "tests": [{
        "interval": "5s",
        "input_series": [{"series": 'redis_key_size{job="redis", host="h", instance="h:9121", key="celery"}',
                          "values": "0 200x20"}],
        "alert_rule_test": [{"eval_time": "30s", "alertname": "HighQueueDepth", "exp_alerts": []},
                            {"eval_time": "35s", "alertname": "HighQueueDepth",
                             "exp_alerts": [{"exp_labels": {"severity": "warning", "host": "h"}}]}]}]}
    (tmp_path / "scaled_test.yml").write_text(yaml.safe_dump(case))
    out = subprocess.run(["promtool", "test", "rules", "scaled_test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, check=False)
    # exp_annotations left out on purpose: promtool then only checks they are absent, so expect that failure
    assert "HighQueueDepth, time: 35s" in out.stdout + out.stderr and "got:[\n" in out.stdout + out.stderr
    assert 'Labels:{alertname="HighQueueDepth", host="h", severity="warning"}' in out.stdout + out.stderr
    assert "time: 30s" not in out.stdout + out.stderr


def test_scale_rules_cli_bad_input(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(MONITORING / "scale_rules.py"), "--factor", "0.1", "--min-range",
                             "4 s", str(RULES[0]), "-o", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a Prometheus duration" in result.stderr


# -- Alertmanager --------------------------------------------------------------------------------------

def test_amtool_check_config_and_routes() -> None:
    require(["amtool"])
    run(["amtool", "check-config", "alertmanager.yml"])
    route = lambda *labels: run(["amtool", "config", "routes", "test", "--config.file=alertmanager.yml",
                                 *labels]).stdout.strip()
    assert route("severity=critical", "alertname=TunnelDown", "host=a") == "critical"
    assert route("severity=warning", "alertname=HighQueueDepth", "host=a") == "webhook"
    config = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    assert config["route"]["group_by"] == ["host"]
    tunnel = next(r for r in config["inhibit_rules"] if r["source_matchers"] == ['alertname="TunnelDown"'])
    assert tunnel["equal"] == ["host"]
    inhibited = set(re.search(r'=~"(.*)"', tunnel["target_matchers"][0]).group(1).split("|"))  # type: ignore[union-attr]
    assert inhibited == set(contract_alerts()) - {"TunnelDown"}


def test_commented_email_and_slack_examples_are_valid(tmp_path: Path) -> None:
    require(["amtool"])
    text = (MONITORING / "alertmanager.yml").read_text()
    uncommented = re.sub(r"^(\s*)# ((?:smtp_|slack_api|email_configs|slack_configs|  - to|    send_resolved|"
                         r"  - channel|    title|    text).*)$", r"\1\2", text, flags=re.MULTILINE)
    assert uncommented.count("email_configs:") == 1 and "\n    slack_configs:" in uncommented
    assert "password_file" in uncommented and "api_url_file" in uncommented  # secrets from files
    (tmp_path / "am.yml").write_text(uncommented)
    run(["amtool", "check-config", str(tmp_path / "am.yml")])


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]]

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Webhook,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def test_tunnel_down_inhibits_the_hosts_other_alerts(tmp_path: Path, webhook: tuple[str, list]) -> None:
    """A real Alertmanager with monitoring/alertmanager.yml: one page for a host whose tunnel is down, and
    RedisDown holds back the worker alerts it causes."""
    require(["prometheus-alertmanager"])
    url, received = webhook
    stack = run_linux.LinuxStack(tmp_path, prometheus_port=free_port(), alertmanager_port=free_port(),
                                 webhook_url=url)
    try:
        stack.start(prometheus=False)
        alerts = [{"labels": {"alertname": name, "host": host, "severity": severity},
                   "annotations": {"summary": f"{name} on {host}"}}
                  for name, host, severity in [("TunnelDown", "a", "critical"), ("RedisDown", "a", "critical"),
                                               ("ExporterScrapeFailing", "a", "warning"),
                                               ("NoWorkersOnline", "a", "critical"), ("RedisDown", "b", "critical"),
                                               ("WorkerDown", "b", "warning")]]
        request = urllib.request.Request(f"{stack.alertmanager_url}/api/v2/alerts", json.dumps(alerts).encode(),
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

        def states() -> dict[tuple[str, str], str] | None:
            with urllib.request.urlopen(f"{stack.alertmanager_url}/api/v2/alerts", timeout=5) as response:
                got = {(a["labels"]["alertname"], a["labels"]["host"]): a["status"]["state"] for a in json.load(response)}
            return got if len(got) == 6 and "unprocessed" not in got.values() else None
        got = wait_until(states, 10, "Alertmanager to process the alerts")
        assert got == {("TunnelDown", "a"): "active", ("RedisDown", "a"): "suppressed",
                       ("ExporterScrapeFailing", "a"): "suppressed", ("NoWorkersOnline", "a"): "suppressed",
                       ("RedisDown", "b"): "active", ("WorkerDown", "b"): "suppressed"}
        # critical group_wait is 10 s: both hosts' pages arrive, each with only its uninhibited alert
        wait_until(lambda: len(received) >= 2, 30, "two notifications (host a, host b)", interval=0.2)
        pages = {n["groupLabels"]["host"]: [a["labels"]["alertname"] for a in n["alerts"]] for n in received}
        assert pages == {"a": ["TunnelDown"], "b": ["RedisDown"]}, received
    finally:
        stack.stop()


# -- Grafana, compose ----------------------------------------------------------------------------------

def dashboard_panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_dashboard_panels_datasource_units_thresholds() -> None:
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert uid == "tunnel-prometheus" and datasource["datasources"][0]["url"] == "http://127.0.0.1:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Pipeline", "Tunnel health"]
    titles = [p["title"] for p in panels]
    for seed in ("Pending tasks", "Tasks completed", "Tasks failed", "Workers online", "API request rate",
                 "API p95 latency", "Redis memory", "PostgreSQL connections"):
        assert seed in titles, seed
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"], panel["title"]
        assert all('host=~"$host"' in t["expr"] for t in panel["targets"]), panel["title"]
    expr = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    assert 'redis_key_size{job="redis", host=~"$host", key="celery"}' in expr["Pending tasks"]
    assert "celery_workers_online" in expr["Workers online"]
    everything = " ".join(expr.values())
    assert "flower_worker_online" not in everything and "task-received" not in everything
    tunnel = " ".join(expr[t] for t in titles[titles.index("SSH tunnel"):])
    for metric in ("tunnel_forward_up", "tunnel_reconnects_total", "tunnel_ssh_rtt_seconds", "tunnel_forward_bytes_total"):
        assert metric in tunnel, metric
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "host")
    assert variable["datasource"]["uid"] == uid and variable["includeAll"]


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """Each panel expression, variables substituted, as a recording rule: promtool parses it statically."""
    require(["promtool"])
    queries = render_report.panel_queries(render_report.load_dashboard(DASHBOARD),
                                          {"host": "prod-1", **render_report.macros(3600, 15, 15)})
    rules = {"groups": [{"name": "panels", "rules": [{"record": f"panel:{i}", "expr": q.expr}
                                                     for i, q in enumerate(queries)]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    run(["promtool", "check", "rules", str(tmp_path / "panels.yml")])
    assert render_report.macros(3600, 15, 15)["__rate_interval"] == "60s"  # Grafana: max(4 x scrape, ...)
    assert render_report.substitute("a{h=~\"${host}\"}[$__range]", {"host": "x", "__range": "1h"}) == 'a{h=~"x"}[1h]'
    with pytest.raises(KeyError):
        render_report.substitute("$nope", {})


def test_dashboard_provider_matches_the_compose_mounts() -> None:
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    for compose in COMPOSE_FILES:
        grafana = yaml.safe_load(compose.read_text())["services"]["grafana"]
        assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
        assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_loopback_only_pinned_no_default_password(compose: Path) -> None:
    services = yaml.safe_load(compose.read_text())["services"]
    assert {"prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        if "image" in service:
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), f"{name}: tag not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        mode = service.get("network_mode", "")
        assert mode in ("", "host", "service:prometheus"), mode
        if mode == "host":  # nothing is published: the process itself must listen on loopback
            assert not service.get("ports")
            flags = " ".join(service.get("command", [])) + json.dumps(service.get("environment", {}))
            assert "127.0.0.1" in flags and "0.0.0.0" not in flags, name
    assert services["prometheus"]["image"].startswith("prom/prometheus:v2.48")
    assert services["grafana"]["image"].startswith("grafana/grafana:10.2")
    assert "--storage.tsdb.retention.time=90d" in services["prometheus"]["command"]
    assert "--cluster.listen-address=" in services["alertmanager"]["command"]
    env = services["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (MONITORING / source).exists(), volume
    assert ".env" in (MONITORING / ".gitignore").read_text().split()


def test_run_linux_script_starts_and_stops_both(tmp_path: Path) -> None:
    """The operator's command: `monitoring/run-linux`, then SIGTERM (as Ctrl-C or a service manager)."""
    require(["prometheus", "prometheus-alertmanager"])
    import signal

    ports = free_port(), free_port()
    proc = subprocess.Popen([str(MONITORING / "run-linux"), "--data", str(tmp_path), "--prometheus-port",
                             str(ports[0]), "--alertmanager-port", str(ports[1])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def ready() -> bool:
            try:
                for port in ports:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).close()
                return True
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                return False
        wait_until(ready, 30, "run-linux's Prometheus and Alertmanager")
        banner = proc.stdout.readline()  # type: ignore[union-attr]  # printed once run-linux saw both ready
        assert f"Prometheus http://127.0.0.1:{ports[0]}  Alertmanager http://127.0.0.1:{ports[1]}" in banner
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, output
        for port in ports:  # both children are gone with it
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).close()
        assert (tmp_path / "tsdb").is_dir() and (tmp_path / "alertmanager").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_run_linux_busy_port_is_one_line_error(tmp_path: Path) -> None:
    require(["prometheus"])
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = subprocess.run([str(MONITORING / "run-linux"), "--data", str(tmp_path), "--prometheus-port",
                                 str(busy.getsockname()[1]), "--alertmanager-port", str(free_port())],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("run-linux: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "exited" in result.stderr
