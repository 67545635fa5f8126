"""Signals that tell the truth, live: the reference pipeline in a namespace host, read by the real agent
(`python tunnel.py --config ...`) through the restricted `tunnel` account.

- A kill -9'd worker reads celery_worker_up 0 within 12 s (agent defaults: Flower polled every 5 s, Flower
  flags a silent worker after ~4 s), while
  Flower's own flower_worker_online for it still reads 1 (the seed's NoWorkersOnline never fires).
- All workers dead: celery_workers_online 0 and no worker reads 1. A graceful stop and a new worker show.
- Flower unreachable: celery_flower_up 0 and no celery_worker_* series (no stale data).
- Queue depth: workers stopped, 200 tasks enqueued -> redis_key_size{key="celery"} reads 200 through
  the tunnel (the seed's received - succeeded - failed reads 0).
- Nothing on the host listens beyond 127.0.0.1 except sshd (ss -ltnp inside the namespace).
- RAM (RSS) and CPU of redis_exporter, postgres_exporter and Flower are measured and printed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from agent_process import AgentProcess, free_port, parse_metrics
from pipeline_host import BINARIES, PipelineHost, traversable_workdir, tunnel_account
from remote_host import RemoteHost, require, wait_until

pytestmark = pytest.mark.netns

HOST = "prod-1"
DETECT_WITHIN = 30.0  # the bound for a crashed worker
CRASH_SEEN_WITHIN = 12.0  # ~10 s at defaults: Flower's ~4.3 s + the collector's 5 s poll (+ margin)
QUEUE = 'redis_key_size{db="db0",key="celery"}'


@dataclass
class Chain:
    host: RemoteHost
    pipe: PipelineHost
    agent: AgentProcess
    local: dict[str, int]  # forward name -> local port of the agent

    def agent_metrics(self) -> dict[str, float]:
        self.agent.assert_running()
        return self.agent.metrics()

    def up(self, worker: str) -> float | None:
        return self.agent_metrics().get(f'celery_worker_up{{host="{HOST}",worker="{worker}"}}')

    def online(self) -> float | None:
        return self.agent_metrics().get(f'celery_workers_online{{host="{HOST}"}}')

    def through_tunnel(self, forward: str, auth: bool = False) -> dict[str, float]:
        """A /metrics page fetched through the agent's local forward (what Prometheus scrapes)."""
        import urllib.request
        from base64 import b64encode

        request = urllib.request.Request(f"http://127.0.0.1:{self.local[forward]}/metrics")
        if auth:
            token = b64encode(":".join(self.pipe.flower_auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def flower_online(self, worker: str) -> float | None:
        return self.through_tunnel("flower", auth=True).get(f'flower_worker_online{{worker="{worker}"}}')

    def ensure_workers(self, count: int, agent_view: bool = True) -> list[str]:
        """Exactly `count` live workers (and, with agent_view, the agent seeing them all up)."""
        while len(self.pipe.worker_names) > count:
            self.pipe.stop_worker(self.pipe.worker_names[-1])
        while len(self.pipe.worker_names) < count:
            self.pipe.start_worker()
        names = self.pipe.worker_names
        if not agent_view:
            return names
        wait_until(lambda: all(self.up(n) == 1 for n in names) and self.online() == count, 40,
                   f"agent sees {names} up")
        return names


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    require(["ip", "/usr/sbin/sshd", "ssh-keygen", "useradd", "userdel", "ss", *BINARIES])
    workdir = traversable_workdir()
    tmp = tmp_path_factory.mktemp("celery-chain")
    try:
        with RemoteHost(workdir) as host, tunnel_account(host) as user:
            host.authorized_keys.chmod(0o644)
            host.start_sshd()
            with PipelineHost(host, workers=2, task_seconds=0.2) as pipe:
                known = tmp / "known_hosts"
                known.write_text(host.known_hosts_line())
                password = tmp / "flower.pass"
                password.write_text(pipe.flower_auth[1] + "\n")
                password.chmod(0o600)
                local = {name: free_port() for name in ("api", "flower", "postgres", "redis")}
                forwards = ", ".join(f"{{name: {n}, local_port: {p}}}" for n, p in local.items())
                config = tmp / "hosts.yml"
                config.write_text(
                    "hosts:\n"
                    f"  - name: {HOST}\n"
                    f"    ssh: {user}@{host.addr}\n"
                    f"    identity_file: {host.client_key}\n"
                    f"    known_hosts: {known}\n"
                    f"    forwards: [{forwards}]\n"
                    f"    flower_auth: {{username: {pipe.flower_auth[0]}, password_file: {password}}}\n")
                with AgentProcess(["-q", "-F", "none", "--config", str(config)], tmp) as agent:
                    agent.wait_up()
                    yield Chain(host, pipe, agent, local)
                    assert agent.stop() == 0, agent.output()[-2000:]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_crashed_worker_drops_within_30s_while_flower_still_says_online(chain: Chain) -> None:
    w1, w2 = chain.ensure_workers(2)
    assert chain.agent_metrics()[f'celery_flower_up{{host="{HOST}"}}'] == 1
    assert chain.flower_online(w1) == 1

    killed = time.monotonic()
    chain.pipe.kill_worker(w1)
    wait_until(lambda: chain.up(w1) == 0, CRASH_SEEN_WITHIN, f"celery_worker_up of kill -9'd {w1} reads 0")
    detected = time.monotonic() - killed
    assert chain.up(w2) == 1 and chain.online() == 1
    # the point: Flower's own gauge still calls the dead worker online (it waits for worker-offline)
    assert chain.flower_online(w1) == 1, "Flower noticed the crash by itself"
    print(f"\nkill -9 {w1}: celery_worker_up 0 after {detected:.1f}s; "
          f"flower_worker_online still 1 at {time.monotonic() - killed:.1f}s")

    chain.pipe.kill_worker(w2)
    wait_until(lambda: chain.online() == 0, DETECT_WITHIN, "celery_workers_online 0 after every worker died")
    samples = chain.agent_metrics()
    assert not [k for k, v in samples.items() if k.startswith("celery_worker_up{") and v == 1], samples
    assert chain.flower_online(w2) == 1  # and the seed's NoWorkersOnline (flower_worker_online == 0) is silent

    fresh = chain.pipe.start_worker()
    wait_until(lambda: chain.up(fresh) == 1 and chain.online() == 1, DETECT_WITHIN, f"new worker {fresh} up")
    chain.pipe.stop_worker(fresh)  # graceful: worker-offline is sent, both signals agree
    wait_until(lambda: chain.up(fresh) == 0 and chain.online() == 0, DETECT_WITHIN, f"stopped {fresh} down")
    assert chain.flower_online(fresh) == 0


@pytest.mark.slow
def test_flower_unreachable_exports_no_stale_worker_data(chain: Chain) -> None:
    chain.ensure_workers(1)
    chain.pipe.stop_service("flower")
    try:
        wait_until(lambda: chain.agent_metrics().get(f'celery_flower_up{{host="{HOST}"}}') == 0, DETECT_WITHIN,
                   "celery_flower_up 0")
        samples = chain.agent_metrics()
        assert not [k for k in samples if k.startswith(("celery_worker_up{", "celery_workers_online{"))], samples
    finally:
        chain.pipe.start_service("flower")
    names = chain.pipe.worker_names
    wait_until(lambda: chain.online() == 1 and chain.up(names[0]) == 1, DETECT_WITHIN, "workers back after Flower")


def test_queue_depth_is_the_broker_list_length(chain: Chain) -> None:
    chain.pipe.stop_all_workers()
    chain.pipe.enqueue(200, audio_seconds=0.01)
    assert chain.pipe.queue_length() == 200
    wait_until(lambda: chain.through_tunnel("redis").get(QUEUE) == 200, 10, "redis_key_size 200 through the tunnel")
    flower = chain.through_tunnel("flower", auth=True)

    def events(kind: str) -> float:
        return sum(v for k, v in flower.items() if k.startswith("flower_events_total{") and f'type="{kind}"' in k)
    seed_formula = events("task-received") - events("task-succeeded") - events("task-failed")
    assert seed_formula != 200, "the seed's formula happens to agree here"
    chain.pipe.start_worker()
    wait_until(lambda: chain.through_tunnel("redis").get(QUEUE) == 0, 60, "the queue drains to 0")


def test_api_metrics_as_the_seed_says_and_results_in_postgres(chain: Chain) -> None:
    chain.ensure_workers(1, agent_view=False)
    status, body = chain.pipe.post(8000, "/transcribe", b'{"audio_seconds": 0.05}')
    assert status == 202, body
    task_id = json.loads(body)["task_id"]

    def stored() -> dict | None:
        code, row = chain.pipe.get(8000, f"/jobs/{task_id}")
        return json.loads(row) if code == 200 else None
    row = wait_until(stored, 20, "the task's row in PostgreSQL")
    assert row["status"] == "succeeded" and row["worker"] in chain.pipe.worker_names  # type: ignore[index]

    chain.pipe.set_error_rate(0.5)
    chain.pipe.start_load(rate=20, audio_seconds=0.01)
    try:
        def answered_500() -> bool:
            page = chain.through_tunnel("api")
            return any(k.startswith("http_requests_total{") and 'status="500"' in k for k in page)
        wait_until(answered_500, 20, "injected 500s in http_requests_total through the tunnel")
    finally:
        chain.pipe.stop_load()
        chain.pipe.set_error_rate(0.0)
    page = chain.through_tunnel("api")
    assert page['http_requests_total{endpoint="/transcribe",method="POST",status="202"}'] >= 1
    assert 'http_request_duration_seconds_bucket{endpoint="/transcribe",le="+Inf",method="POST"}' in page
    assert page["http_requests_in_progress"] == 0
    assert not [k for k in page if 'endpoint="/jobs/' in k and "{id}" not in k], "raw paths as label values"


def test_nothing_on_the_host_listens_beyond_loopback_except_sshd(chain: Chain) -> None:
    chain.ensure_workers(1, agent_view=False)
    out = chain.host.exec(["ss", "-ltnpH"]).stdout
    listeners = []
    for line in out.splitlines():
        fields = line.split()
        local, process = fields[3], " ".join(fields[5:])
        listeners.append((local, process))
    beyond = [(a, p) for a, p in listeners if not a.startswith("127.0.0.1:")]
    assert len(beyond) == 1 and beyond[0][0] == f"{chain.host.addr}:22" and "sshd" in beyond[0][1], beyond
    ports = {int(a.rsplit(":", 1)[1]) for a, _ in listeners if a.startswith("127.0.0.1:")}
    assert {8000, 5555, 9187, 9121, 6379, 5432} <= ports, listeners


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match, pid
    return int(match.group(1)) / 1024


def test_exporter_footprint_is_measured(chain: Chain) -> None:
    """RSS and CPU per scrape of the exporters on this host (figures for server-side/README.md; no bounds)."""
    chain.ensure_workers(2, agent_view=False)
    exporters = {"redis_exporter": ("redis", False), "postgres_exporter": ("postgres", False),
                 "flower": ("flower", True)}
    pids = chain.pipe.pids()
    scrapes = 20
    report = {}
    for name, (forward, auth) in exporters.items():
        pid = pids[name]
        before, start = _cpu_seconds(pid), time.monotonic()
        for _ in range(scrapes):
            assert chain.through_tunnel(forward, auth)
        cpu = (_cpu_seconds(pid) - before) / scrapes
        report[name] = {"rss_mib": round(_rss_mib(pid), 1), "cpu_ms_per_scrape": round(cpu * 1000, 1),
                        "wall_ms_per_scrape": round((time.monotonic() - start) / scrapes * 1000, 1)}
        assert report[name]["rss_mib"] > 1
    idle = {name: _cpu_seconds(pids[name]) for name in exporters}  # no scrapes: background work only
    window = 10.0
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started >= window, window + 5, "the idle window", interval=0.5)
    for name in exporters:
        report[name]["idle_cpu_percent"] = round((_cpu_seconds(pids[name]) - idle[name]) / window * 100, 2)
    print("\nexporter footprint:", json.dumps(report))


# -- the collector against a real HTTP server standing in for Flower's API (no namespace needed) ----------
class _FakeFlower:
    """A real HTTP server on 127.0.0.1:0 answering /api/workers?status=true as told (status, body, delay)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status, self.body, self.delay, self.auth_seen = 200, b"{}", 0.0, ""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                owner.auth_seen = self.headers.get("Authorization", "")
                time.sleep(owner.delay)
                self.send_response(owner.status)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                try:
                    self.wfile.write(owner.body)
                except BrokenPipeError:  # the client gave up (the timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_flower() -> Iterator[_FakeFlower]:
    server = _FakeFlower()
    yield server
    server.close()


def _samples(collector: object) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return parse_metrics(generate_latest(registry).decode())


def test_collector_exports_flowers_heartbeat_view(fake_flower: _FakeFlower) -> None:
    from agent.collectors.celery_workers import CeleryWorkersCollector

    fake_flower.body = json.dumps({"celery@a": True, "celery@b": False}).encode()
    collector = CeleryWorkersCollector("h1", fake_flower.url, auth=("monitor", "s3cret"))
    collector.poll()
    assert _samples(collector) == {'celery_flower_up{host="h1"}': 1.0,
                                   'celery_worker_up{host="h1",worker="celery@a"}': 1.0,
                                   'celery_worker_up{host="h1",worker="celery@b"}': 0.0,
                                   'celery_workers_online{host="h1"}': 1.0}
    assert fake_flower.auth_seen.startswith("Basic ")
    fake_flower.body = b"{}"  # Flower restarted and knows no worker yet: "no workers", not stale ones
    collector.poll()
    assert _samples(collector) == {'celery_flower_up{host="h1"}': 1.0, 'celery_workers_online{host="h1"}': 0.0}


@pytest.mark.parametrize("status,body", [(401, b"Unauthorized"), (500, b"oops"), (200, b"<html>"),
                                         (200, b'{"celery@a": "yes"}'), (200, b"[]")])
def test_collector_drops_worker_data_when_flower_cannot_be_read(fake_flower: _FakeFlower, status: int,
                                                                 body: bytes) -> None:
    from agent.collectors.celery_workers import CeleryWorkersCollector

    fake_flower.body = b'{"celery@a": true}'
    collector = CeleryWorkersCollector("h1", fake_flower.url)
    collector.poll()
    assert _samples(collector)['celery_worker_up{host="h1",worker="celery@a"}'] == 1.0
    fake_flower.status, fake_flower.body = status, body
    collector.poll()
    assert _samples(collector) == {'celery_flower_up{host="h1"}': 0.0}
    assert collector.last_error


def test_collector_never_blocks_longer_than_its_timeout(fake_flower: _FakeFlower) -> None:
    from agent.collectors.celery_workers import CeleryWorkersCollector

    fake_flower.delay = 2.0
    collector = CeleryWorkersCollector("h1", fake_flower.url, timeout=0.5)
    started = time.monotonic()
    collector.poll()
    assert time.monotonic() - started < 1.8
    assert _samples(collector) == {'celery_flower_up{host="h1"}': 0.0}
    unreachable = CeleryWorkersCollector("h2", f"http://127.0.0.1:{free_port()}", timeout=0.5)
    unreachable.poll()
    assert _samples(unreachable) == {'celery_flower_up{host="h2"}': 0.0}


def test_collector_forgets_an_answer_older_than_stale_after(fake_flower: _FakeFlower) -> None:
    from agent.collectors.celery_workers import CeleryWorkersCollector

    now = [1000.0]
    fake_flower.body = b'{"celery@a": true}'
    collector = CeleryWorkersCollector("h1", fake_flower.url, stale_after=60, clock=lambda: now[0])
    collector.poll()
    now[0] += 59
    assert _samples(collector)['celery_workers_online{host="h1"}'] == 1.0
    now[0] += 2  # no poll for 61 s (e.g. the prober is stuck): unknown, not "1 worker up"
    assert _samples(collector) == {'celery_flower_up{host="h1"}': 0.0}
