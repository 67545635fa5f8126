"""Smoke test of bench/: `bench/run --quick` end to end (tiny counts), its output, and its clean-up.

No timing or ratio is asserted here (machines are noisy; the numbers belong to bench/README.md). What
is asserted: the run exits 0 and prints the one summary table; every configuration of every benchmark
really carried the right bytes (sha256-checked by the fetcher); every fault was recovered from; and
nothing is left behind, neither after a normal run nor after Ctrl-C in the middle of one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_host import PREFIX, require, wait_until

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RUN = BENCH / "run"
BINARIES = ("ip", "/usr/sbin/sshd", "ssh", "ssh-keygen", "autossh", "iptables")
CONFIGS = ("direct", "ssh -L", "agent", "sshtunnel")

sys.path.insert(0, str(BENCH))
import report


def _bench_env(marker: str) -> dict[str, str]:
    """The run's environment, marked so that every process it starts can be found in /proc afterwards."""
    return {**os.environ, "TUNNEL_BENCH_MARKER": marker, "PYTHON": sys.executable}


def _marked_processes(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries `marker`."""
    needle = f"TUNNEL_BENCH_MARKER={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _namespaces_of(pid: int) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{PREFIX}{pid}x")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One `bench/run --quick` (every benchmark, tiny counts); its results, output and leftovers."""
    require(BINARIES)
    tmp = tmp_path_factory.mktemp("bench")
    marker = uuid.uuid4().hex
    out = tmp / "results.json"
    proc = subprocess.Popen([str(RUN), "--quick", "--json", str(out), "--e2e-results", str(tmp / "absent.json"),
                             "--workdir", str(tmp / "work")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_bench_env(marker), cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    leftovers = {"processes": _marked_processes(marker), "namespaces": _namespaces_of(proc.pid)}
    yield {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "leftovers": leftovers,
           "results": json.loads(out.read_text()) if out.exists() else {}}


pytestmark = [pytest.mark.netns]


@pytest.mark.slow
def test_quick_run_prints_one_table(quick_run: dict[str, Any]) -> None:
    assert quick_run["returncode"] == 0, quick_run["stderr"][-3000:]
    lines = quick_run["stdout"].strip().splitlines()
    assert lines[0].startswith("bench/run ") and " cores" in lines[0]
    assert "| measure | agent | reference | ratio / verdict |" in lines
    body = "\n".join(lines)
    for measure in ("latency p50/p95", "new connection", "keep-alive", "throughput", "recovery after sshd restart",
                    "recovery after session kill -9", "blackhole detection", "fleet 5 hosts x 5 forwards: memory",
                    "idle CPU"):
        assert measure in body, f"{measure!r} missing from the table:\n{body}"
    assert "| fault-to-alert times (tests/e2e, bench/results/e2e.json) | not run |" in body
    table_rows = [line for line in lines if line.startswith("| ")]
    assert all(line.count("|") == 5 for line in table_rows), table_rows


@pytest.mark.slow
def test_latency_every_configuration_byte_exact(quick_run: dict[str, Any]) -> None:
    latency = quick_run["results"]["latency"]
    assert 365_000 <= latency["page_bytes"] <= 367_000  # the 366 KB page of issue 3
    assert set(latency["modes"]) == {"new connection", "keep-alive"}
    for mode, rows in latency["modes"].items():
        assert set(rows) == set(CONFIGS)
        for label, row in rows.items():
            assert row["error_count"] == 0, (mode, label, row["errors"])
            assert row["bytes_ok"] == latency["requests"] == 3, (mode, label, row)
            assert row["p50"] > 0 and row["p95"] >= row["p50"]
            assert row["ratio_p50"] > 0
        assert rows["ssh -L"]["ratio_p50"] == pytest.approx(1.0)


@pytest.mark.slow
def test_throughput_byte_exact(quick_run: dict[str, Any]) -> None:
    throughput = quick_run["results"]["throughput"]
    assert throughput["bytes"] == 1024 * 1024
    assert set(throughput["configs"]) == {"direct", "ssh -L", "agent"}
    for label, row in throughput["configs"].items():
        assert row["error_count"] == 0, (label, row["errors"])
        assert row["bytes_ok"] == row["transfers"] == throughput["rounds"], (label, row)
        assert row["mb_per_s"] > 0


@pytest.mark.slow
def test_faults_recovered_by_both(quick_run: dict[str, Any]) -> None:
    faults = quick_run["results"]["faults"]
    for fault in ("sshd_restart", "session_kill9"):
        tunnels = faults[fault]["tunnels"]
        assert set(tunnels) == {"agent", "autossh (seed)"}
        for label, row in tunnels.items():
            assert row["recovered"] and row["bytes_ok"], (fault, label, row)
    blackhole = faults["blackhole"]
    assert blackhole["detected_seconds"]["agent"] is not None, blackhole
    assert blackhole["recovered_after_clear"]["agent"]["recovered"], blackhole
    assert faults["alive_after"] == {"agent": True, "autossh (seed)": True}


@pytest.mark.slow
def test_fleet_every_forward_answers(quick_run: dict[str, Any]) -> None:
    fleet = quick_run["results"]["fleet"]
    assert fleet["hosts"] == 5 and fleet["forwards"] == 25
    assert fleet["agent"]["forwards_ok"] == 25
    assert fleet["autossh"]["forwards_ok"] == 25
    assert fleet["agent"]["processes"] == 1 and fleet["autossh"]["processes"] == 10  # autossh + its ssh, per host
    assert fleet["agent"]["rss_mb"] > 0 and fleet["autossh"]["rss_mb"] > 0


@pytest.mark.slow
def test_quick_run_leaves_nothing_behind(quick_run: dict[str, Any]) -> None:
    assert quick_run["leftovers"] == {"processes": [], "namespaces": []}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_in_the_middle_cleans_up(tmp_path: Path) -> None:
    require(BINARIES)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([str(RUN), "--quick", "--only", "faults", "--json", str(tmp_path / "r.json"),
                             "--workdir", str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_bench_env(marker), cwd=ROOT)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # bounded: the run prints a line per step and ends by itself
            seen.append(line)
            if "blackhole" in line or time.monotonic() > deadline:
                break
        assert any("blackhole" in line for line in seen), "".join(seen)
        runner_pid = _runner_pid(proc.pid)
        namespaces = _namespaces_of(runner_pid)
        assert namespaces, "the run should have a namespace host while the blackhole is on"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest
    assert _namespaces_of(runner_pid) == []
    wait_until(lambda: _marked_processes(marker) == [], 10, "every process of the interrupted run to exit")
    assert not (tmp_path / "r.json").exists()


def _runner_pid(pid: int) -> int:
    """bench/run execs python in place, so its PID is the runner's (RemoteHost names namespaces by it)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"runner.py" in cmdline, cmdline
    return pid


def test_e2e_results_file_format(tmp_path: Path) -> None:
    """The format documented in bench/README.md is what the table reads; absent means 'not run'."""
    path = tmp_path / "e2e.json"
    assert report.load_e2e(path) is None
    assert any(row[1] == "not run" for row in report.rows({}, None))
    path.write_text(json.dumps({
        "generated": "2026-11-25T10:00:00Z", "time_scale": 0.1,
        "alerts": [
            {"fault": "kill -9 one worker of two", "alert": "WorkerDown", "fired_seconds": 9.5,
             "production_seconds": 62.0, "resolved_seconds": 14.0, "seed": "never"},
            {"fault": "sshd stopped", "alert": "TunnelDown", "fired_seconds": None},
        ]}))
    e2e = report.load_e2e(path)
    assert e2e is not None
    rows = report.rows({}, e2e)
    assert rows[0] == ("alert WorkerDown <- kill -9 one worker of two (time scale 0.1)", "9.50 s", "never",
                       "at production settings ~62.0 s; resolved 14.0 s")
    assert rows[1][1] == "NOT FIRED"
    path.write_text(json.dumps({"alerts": [{"fault": "x"}]}))
    with pytest.raises(ValueError, match="alerts\\[0\\] has no 'alert'"):
        report.load_e2e(path)
