"""The live status an operator sees, and the service files that run the agent unattended."""
from __future__ import annotations

import io
import plistlib
import shutil
import subprocess
import time
from pathlib import Path

from agent.auth import Identities
from agent.config import Forward, HostConfig
from agent.forward import Acceptor
from agent.status import StatusDisplay, render
from agent.supervisor import HostTunnel
from remote_host import require

SERVICE_DIR = Path(__file__).resolve().parent.parent / "docs" / "service"


def tunnel_with_state() -> HostTunnel:
    host = HostConfig(name="prod-1", hostname="10.0.0.5", user="tunnel",
                      forwards=(Forward("redis", 9121, 19121), Forward("api", 8000, 18000)))
    tunnel = HostTunnel(host, Identities(), acceptor=None)  # type: ignore[arg-type]
    tunnel.stats.state = "backoff"
    tunnel.stats.last_error = "connection to 10.0.0.5:22 refused: is sshd running there, on port 22?"
    tunnel.stats.last_error_at = time.time() - 3
    tunnel.stats.retry_at = time.time() + 4
    redis = tunnel.forwards["redis"]
    redis.listening = True
    redis.record_error("channel to 127.0.0.1:9121 refused: administratively prohibited (PermitOpen ...)")
    return tunnel


def test_status_shows_host_forward_state_and_last_error():
    lines = render([tunnel_with_state()], width=200)
    assert lines[0].startswith("prod-1 (tunnel@10.0.0.5)  BACKOFF") and "retry in" in lines[0]
    assert "last error 3s ago: connection to 10.0.0.5:22 refused" in lines[1]
    redis_row = next(line for line in lines if line.strip().startswith("redis"))
    assert "127.0.0.1:19121" in redis_row and "-> 127.0.0.1:9121" in redis_row and "waiting" in redis_row
    assert "administratively prohibited" in redis_row
    api_row = next(line for line in lines if line.strip().startswith("api"))
    assert "closed" in api_row  # its listener is not bound


def test_status_redraws_in_place_on_a_terminal():
    out = io.StringIO()
    tunnel = tunnel_with_state()
    display = StatusDisplay(lambda: [tunnel], stream=out, header="tunnel 0.1.0", interactive=True)
    display.draw()
    tunnel.stats.state = "up"
    display.draw()
    display.draw()  # unchanged: nothing written
    text = out.getvalue()
    assert text.count("tunnel 0.1.0") == 2 and "\x1b[" in text and "UP" in text


def test_status_logs_one_line_per_change_without_a_terminal(caplog):
    tunnel = tunnel_with_state()
    display = StatusDisplay(lambda: [tunnel], stream=io.StringIO(), interactive=False)
    with caplog.at_level("INFO", logger="agent.status"):
        display.changed(tunnel)
        display.changed(tunnel)
    assert [r.getMessage() for r in caplog.records] == [f"prod-1: DOWN, retrying: {tunnel.stats.last_error}"]


def test_acceptor_threads_end_on_close():
    acceptor = Acceptor()
    acceptor.close()
    assert not any(t.name == "acceptor" and t.is_alive() for t in __import__("threading").enumerate())


def test_systemd_unit_verifies(tmp_path):
    require(["systemd-analyze"])
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "tunnel").symlink_to(shutil.which("true") or "/bin/true")
    unit = tmp_path / "tunnel.service"
    unit.write_text((SERVICE_DIR / "tunnel.service").read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "RestartPreventExitStatus=2" in text


def test_launchd_plist_runs_the_agent_with_the_fleet_config():
    with open(SERVICE_DIR / "io.github.tunnel.agent.plist", "rb") as handle:
        plist = plistlib.load(handle)
    assert plist["ProgramArguments"][0].endswith("/tunnel") and "--config" in plist["ProgramArguments"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True


def test_tunnel_py_is_a_thin_entry_point():
    text = (Path(__file__).resolve().parent.parent / "tunnel.py").read_text()
    assert len([line for line in text.splitlines() if line.strip()]) <= 4 and "from agent.cli import main" in text
