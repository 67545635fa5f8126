"""The fleet config: what loads, and errors that name the file, line and key."""
from __future__ import annotations

import json
from pathlib import Path

import paramiko
import pytest

from agent.config import AgentConfig
from agent.discovery import file_sd_targets, write_file_sd
from agent.errors import UsageError
from agent.yamlconfig import load_config, port_memory

EMPTY_SSH = paramiko.SSHConfig.from_text("")


def load(tmp_path: Path, text: str, **kwargs) -> AgentConfig:
    path = tmp_path / "hosts.yml"
    path.write_text(text)
    return load_config(path, ssh_config=kwargs.pop("ssh_config", EMPTY_SSH), **kwargs)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as error:
        load(tmp_path, text)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_fleet_with_defaults_labels_and_auto_ports(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWER_PW", "s3cret")
    config = load(tmp_path, """
local_port_range: [20000, 20100]
sd_file: /tmp/x/targets.json
defaults:
  server_alive_interval: 2
  labels: {team: ml}
hosts:
  - name: prod-1
    ssh: tunnel@10.0.0.5:2222
    labels: {env: prod}
    flower_auth: {username: admin, password_env: FLOWER_PW}
  - name: prod-2
    ssh: tunnel@10.0.0.6
    forwards: [redis, {name: api, local_port: 18000}, {name: node, remote_port: 9100}]
""")
    first, second = config.hosts
    assert (first.hostname, first.port, first.user, first.server_alive_interval) == ("10.0.0.5", 2222, "tunnel", 2.0)
    assert first.labels == {"env": "prod"}  # a host's labels replace the defaults' labels
    assert [f.local_port for f in first.forwards] == [20000, 20001, 20002, 20003, 20004]
    assert next(f for f in first.forwards if f.name == "flower").basic_auth == ("admin", "s3cret")
    assert [(f.name, f.remote_port, f.local_port) for f in second.forwards] == [
        ("redis", 9121, 20005), ("api", 8000, 18000), ("node", 9100, 20006)]
    assert str(config.sd_file) == "/tmp/x/targets.json"


def test_reload_keeps_the_ports_forwards_had(tmp_path):
    text = "hosts:\n  - {name: b, ssh: h2, forwards: [redis]}\n"
    before = load(tmp_path, text)
    after = load(tmp_path, "hosts:\n  - {name: a, ssh: h1, forwards: [redis]}\n" + text.split("\n", 1)[1],
                 previous_ports=port_memory(before))
    ports = {h.name: h.forwards[0].local_port for h in after.hosts}
    assert ports["b"] == before.hosts[0].forwards[0].local_port and ports["a"] != ports["b"]


@pytest.mark.parametrize("text, fragments", [
    ("hosts:\n  - name: a\n    ssh: h\n    colour: red\n", [":4:", "unknown key 'colour'", "use one of"]),
    ("hosts:\n  - name: a\n    ssh: h\n    server_alive_interval: soon\n", [":4:", "server_alive_interval",
                                                                            "positive number"]),
    ("hosts:\n  - name: a\n", [":2:", "no `ssh:`"]),
    ("hosts: []\n", ["empty"]),
    ("nothosts: 1\n", ["unknown key 'nothosts'"]),
    ("hosts:\n  - {name: a, ssh: h, forwards: [{name: x, remote_port: 99999}]}\n", ["remote_port", "1-65535"]),
    ("hosts:\n  - {name: a, ssh: h, forwards: [mysql]}\n", ["'mysql' is not a default forward"]),
    ("hosts:\n  - {name: a, ssh: h, forwards: [{name: api, local_port: 18000}]}\n"
     "  - {name: b, ssh: h, forwards: [{name: api, local_port: 18000}]}\n", [":3:", "local port 18000",
                                                                             "a/api"]),
    ("hosts:\n  - {name: a, ssh: h}\n  - {name: a, ssh: g}\n", ["'a' is used twice"]),
    ("hosts:\n  - {name: a, ssh: h, labels: {job: x}}\n", ["set by the agent"]),
    ("hosts:\n  - {name: a, ssh: h, flower_auth: {username: u, password: p}}\n", ["unknown key 'password'"]),
    ("hosts:\n  - {name: a, ssh: 'bad host'}\n", ["malformed"]),
    ("hosts:\n  - name: a\n   ssh: h\n", ["not valid YAML"]),
])
def test_errors_name_line_and_key(tmp_path, text, fragments):
    message = error_of(tmp_path, text)
    assert str(tmp_path / "hosts.yml") in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.yml", ssh_config=EMPTY_SSH)


def test_ssh_config_alias_is_resolved(tmp_path):
    config = load(tmp_path, "hosts:\n  - {ssh: prod}\n",
                  ssh_config=paramiko.SSHConfig.from_text("Host prod\n  HostName 10.1.1.1\n  User t\n"))
    assert (config.hosts[0].name, config.hosts[0].hostname, config.hosts[0].user) == ("prod", "10.1.1.1", "t")


def test_file_sd_names_the_production_host(tmp_path):
    config = load(tmp_path, "sd_host: host.docker.internal\nhosts:\n"
                            "  - {name: prod-1, ssh: t@10.0.0.5, labels: {env: prod}, forwards: [redis]}\n")
    assert file_sd_targets(config) == [{"targets": [f"host.docker.internal:{config.hosts[0].forwards[0].local_port}"],
                                        "labels": {"env": "prod", "job": "redis", "instance": "prod-1:9121",
                                                   "host": "prod-1"}}]
    target = tmp_path / "sd" / "targets.json"
    write_file_sd(target, config)
    assert json.loads(target.read_text()) == file_sd_targets(config)
    assert [p.name for p in target.parent.iterdir()] == ["targets.json"]  # no temp file left behind


def test_auto_ports_skip_a_port_another_program_holds(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        held = busy.getsockname()[1]
        config = load(tmp_path, f"local_port_range: [{held}, {held + 30}]\n"
                                "hosts:\n  - {name: a, ssh: h1, forwards: [redis, api]}\n")
        ports = [f.local_port for f in config.hosts[0].forwards]
        assert held not in ports and all(held < p <= held + 30 for p in ports) and len(set(ports)) == 2
