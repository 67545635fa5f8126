"""Every alert of the mission proven from a real fault to a real notification, and back to resolved.

Each test causes one fault on the namespace host, waits for the notification at the webhook (through
the real chain: exporter -> SSH tunnel -> Prometheus -> rule -> Alertmanager), undoes the fault and waits
for the resolved notification. The times are recorded (printed, and written to bench/results/e2e.json
for bench/run). The tests share one lab and run in file order; each leaves the pipeline healthy.
"""
from __future__ import annotations

import time

import pytest

from remote_host import wait_until

from e2e_lab import HOST, RESULT_ROWS, Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# generous bounds for the scaled chain: a few scrapes + for: + group_wait, on a loaded 2-core machine
FIRE_TIMEOUT = 90.0
RESOLVE_TIMEOUT = 120.0
# The goal is <= 60 s (issue 8); the bound is the worst case of the sampling steps at production settings:
# Flower's heartbeat window ~4.3 s + one 5 s Flower poll + one 15 s scrape + one 15 s evaluation + for: 15s
# (the next evaluation) + WorkerDown's group_wait 10 s = ~65 s, plus margin for a loaded CI machine.
PRODUCTION_CRASH_BOUND = 85.0


def _healthy(lab: Lab) -> None:
    """Wait until the pipeline is back to normal: no alert firing in Prometheus."""
    wait_until(lambda: not lab.firing_alerts(), RESOLVE_TIMEOUT, "no alert firing")


def test_worker_killed_fires_worker_down_for_that_worker(lab: Lab):
    victim, survivor = lab.pipe.worker_names[0], lab.pipe.worker_names[1]
    t0 = time.monotonic()
    lab.pipe.kill_worker(victim)
    fired = lab.webhook.wait_for("WorkerDown", since=t0, timeout=FIRE_TIMEOUT, host=HOST, worker=victim)
    assert fired.labels["severity"] and fired.annotations["runbook_url"].endswith("WorkerDown.md")
    assert not lab.webhook.find("WorkerDown", since=t0, host=HOST, worker=survivor), "the survivor was reported"
    assert not lab.webhook.find("NoWorkersOnline", since=t0), "one worker is still online"
    lab.fixed()
    lab.pipe.start_worker(victim)  # what systemd's Restart= does: the same worker name comes back
    resolved = lab.webhook.wait_for("WorkerDown", "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT,
                                    host=HOST, worker=victim)
    lab.record("kill -9 one worker of two", "WorkerDown", t0, fired.received, resolved.received,
               seed="never (flower_worker_online stays 1)")
    _healthy(lab)


def test_all_workers_killed_fires_no_workers_online(lab: Lab):
    names = list(lab.pipe.worker_names)
    t0 = time.monotonic()
    lab.pipe.kill_all_workers()
    fired = lab.webhook.wait_for("NoWorkersOnline", since=t0, timeout=FIRE_TIMEOUT, host=HOST)
    assert fired.labels["severity"] == "critical"
    lab.fixed()
    for name in names:
        lab.pipe.start_worker(name)
    resolved = lab.webhook.wait_for("NoWorkersOnline", "resolved", since=fired.received,
                                    timeout=RESOLVE_TIMEOUT, host=HOST)
    lab.record("kill -9 all workers", "NoWorkersOnline", t0, fired.received, resolved.received,
               seed="never (flower_worker_online stays 1)")
    _healthy(lab)


def test_queue_backlog_fires_high_queue_depth(lab: Lab):
    names = list(lab.pipe.worker_names)
    lab.pipe.stop_all_workers()  # graceful: a maintenance stop, the queue fills
    t0 = time.monotonic()
    lab.pipe.enqueue(200, audio_seconds=0.01)
    assert lab.pipe.queue_length() >= 200
    fired = lab.webhook.wait_for("HighQueueDepth", since=t0, timeout=FIRE_TIMEOUT, host=HOST)
    depth = lab.stack.query(f'redis_key_size{{host="{HOST}",key="celery"}}')
    assert depth and float(depth[0]["value"][1]) >= 200, depth
    lab.fixed()
    for name in names:
        lab.pipe.start_worker(name)
    wait_until(lambda: lab.pipe.queue_length() == 0, 120, "the workers to drain the queue")
    resolved = lab.webhook.wait_for("HighQueueDepth", "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT,
                                    host=HOST)
    lab.record("stop workers, enqueue 200 tasks", "HighQueueDepth", t0, fired.received, resolved.received,
               seed="wrong signal (received - succeeded - failed)")
    _healthy(lab)


def test_api_errors_fire_high_api_error_rate(lab: Lab):
    t0 = time.monotonic()
    lab.pipe.set_error_rate(0.2)
    try:
        fired = lab.webhook.wait_for("HighAPIErrorRate", since=t0, timeout=FIRE_TIMEOUT, host=HOST)
    finally:
        lab.fixed()
        lab.pipe.set_error_rate(0.0)
    resolved = lab.webhook.wait_for("HighAPIErrorRate", "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT,
                                    host=HOST)
    lab.record("API answers 5xx for 20 % of requests", "HighAPIErrorRate", t0, fired.received, resolved.received)
    _healthy(lab)


def test_exporter_stopped_is_reported_for_that_forward_only(lab: Lab):
    t0 = time.monotonic()
    lab.pipe.stop_service("redis_exporter")
    try:
        fired = lab.webhook.wait_for("ForwardDown", since=t0, timeout=FIRE_TIMEOUT, host=HOST, forward="redis")
        ups = {r["metric"]["job"]: r["value"][1] for r in lab.stack.query(f'up{{host="{HOST}"}} or up{{job="tunnel"}}')}
        assert ups.pop("redis") == "0" and set(ups.values()) == {"1"}, f"other targets must stay up: {ups}"
        others = [n for n in lab.webhook.since(t0) if n.status == "firing"
                  and n.labels.get("forward", n.labels.get("job", "redis")) != "redis"]
        assert not others, f"only the redis forward may alert: {others}"
    finally:
        lab.fixed()
        lab.pipe.start_service("redis_exporter")
    resolved = lab.webhook.wait_for("ForwardDown", "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT,
                                    host=HOST, forward="redis")
    lab.record("stop redis_exporter", "ForwardDown", t0, fired.received, resolved.received)
    _healthy(lab)


@pytest.mark.parametrize("service, alert", [("redis", "RedisDown"), ("postgres", "PostgresDown")])
def test_data_store_stopped_fires_its_down_alert(lab: Lab, service: str, alert: str):
    t0 = time.monotonic()
    lab.pipe.stop_service(service)
    try:
        fired = lab.webhook.wait_for(alert, since=t0, timeout=FIRE_TIMEOUT, host=HOST)
        assert fired.labels["severity"] == "critical"
    finally:
        lab.fixed()
        lab.pipe.start_service(service)
    resolved = lab.webhook.wait_for(alert, "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT, host=HOST)
    lab.record(f"stop {service}", alert, t0, fired.received, resolved.received)
    _healthy(lab)


def test_sshd_stopped_pages_once_with_tunnel_down(lab: Lab):
    agent_pid = lab.agent.proc.pid
    t0 = time.monotonic()
    lab.host.stop_sshd()
    try:
        fired = lab.webhook.wait_for("TunnelDown", since=t0, timeout=FIRE_TIMEOUT, host=HOST)
        assert fired.labels["severity"] == "critical"
        # the exporters' scrapes fail too: Prometheus fires them, Alertmanager holds them back
        wait_until(lambda: any(a["alertname"] == "ExporterScrapeFailing" for a in lab.firing_alerts()),
                   FIRE_TIMEOUT, "ExporterScrapeFailing firing in Prometheus (to be inhibited)")
        print(f"\n[e2e] sshd stopped: ExporterScrapeFailing firing (inhibited) after {time.monotonic() - t0:.1f} s")
        # nothing may leak through: a leaked alert would be sent within one (scaled) group interval
        time.sleep(lab.longest_group_interval() + 2)
        leaked = [f"{n.alertname}{dict(n.labels)}" for n in lab.webhook.since(t0)
                  if n.status == "firing" and n.alertname != "TunnelDown"]
        assert not leaked, f"TunnelDown must inhibit the host's other alerts: {leaked}"
    finally:
        lab.fixed()
        lab.host.start_sshd()
    resolved = lab.webhook.wait_for("TunnelDown", "resolved", since=fired.received, timeout=RESOLVE_TIMEOUT,
                                    host=HOST)
    lab.record("sshd stopped", "TunnelDown", t0, fired.received, resolved.received)
    _healthy(lab)
    print(f"[e2e] sshd stopped: every alert resolved {time.monotonic() - lab.fixed_at:.1f} s after sshd returned")
    assert lab.agent.proc.pid == agent_pid and lab.agent.proc.poll() is None, "the agent was not restarted"


def test_worker_crash_at_production_settings(production_lab: Lab):
    """The same crash with nothing scaled: 15 s scrapes/evaluations, production rules and routes."""
    lab = production_lab
    victim = lab.pipe.worker_names[-1]
    t0 = time.monotonic()
    lab.pipe.kill_worker(victim)
    try:
        fired = lab.webhook.wait_for("WorkerDown", since=t0, timeout=180, host=HOST, worker=victim)
    finally:
        lab.pipe.start_worker(victim)
    seconds = fired.received - t0
    print(f"\n[e2e] production settings: kill -9 of {victim} -> WorkerDown after {seconds:.1f} s (goal <= 60 s)")
    for row in RESULT_ROWS:
        if row["alert"] == "WorkerDown":
            row["production_seconds"] = round(seconds, 1)
    assert seconds <= PRODUCTION_CRASH_BOUND, (
        f"a crashed worker must be notified within {PRODUCTION_CRASH_BOUND:g} s at production settings "
        f"({seconds:.0f} s)")
