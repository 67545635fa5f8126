"""The ssh-like parsers: every accepted form, and a one-line UsageError naming the fix for the rest."""
from __future__ import annotations

import paramiko
import pytest

from agent.config import (
    normalize_strict_policy,
    parse_destination,
    parse_forward_spec,
    parse_listen_addr,
    parse_port,
    parse_ssh_option,
)
from agent.errors import UsageError
from agent.sshconfig import resolve_host


@pytest.mark.parametrize("spec, expected", [
    ("host", (None, "host", None)),
    ("deploy@10.0.0.5", ("deploy", "10.0.0.5", None)),
    ("deploy@10.0.0.5:2222", ("deploy", "10.0.0.5", 2222)),
    ("a.b-c_d", (None, "a.b-c_d", None)),
    ("u@[::1]:22", ("u", "::1", 22)),
    ("first.last@corp@host", ("first.last@corp", "host", None)),
])
def test_destination_forms(spec, expected):
    assert parse_destination(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("", "malformed"), ("user@", "malformed"), ("a b", "malformed"), ("host:99999", "out of range"),
    ("host:ssh", "not a number"), ("bad user@host", "malformed"), ("@host", "malformed"),
])
def test_destination_errors_name_the_problem(spec, fragment):
    with pytest.raises(UsageError) as error:
        parse_destination(spec)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_forward_spec_forms():
    forward = parse_forward_spec("19121:127.0.0.1:9121")
    assert (forward.name, forward.bind, forward.local_port, forward.remote) == ("redis", "127.0.0.1", 19121,
                                                                                "127.0.0.1:9121")
    assert parse_forward_spec("localhost:8080:127.0.0.1:8000").bind == "127.0.0.1"
    assert parse_forward_spec("[::1]:8080:127.0.0.1:7000").name == "port7000"
    assert parse_forward_spec(":8080:127.0.0.1:8000").bind == "127.0.0.1"


@pytest.mark.parametrize("spec, fragment", [
    ("9121", "malformed"), ("a:b:c", "not a number"), ("1:2:3:4:5", "malformed"),
    ("70000:127.0.0.1:1", "out of range"), ("1::1", "no remote host"),
])
def test_forward_spec_errors(spec, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_forward_spec(spec)


def test_ports():
    assert parse_port("22") == 22
    for bad in ("0", "65536", "-1", "x", ""):
        with pytest.raises(UsageError):
            parse_port(bad)


def test_ssh_options_are_validated_like_openssh():
    assert parse_ssh_option("ServerAliveInterval=3") == ("ServerAliveInterval", "3")
    assert parse_ssh_option("stricthostkeychecking accept-new") == ("StrictHostKeyChecking", "accept-new")
    with pytest.raises(UsageError, match="not supported"):
        parse_ssh_option("Compression=yes")
    with pytest.raises(UsageError, match="positive number"):
        parse_ssh_option("ConnectTimeout=soon")
    with pytest.raises(UsageError, match="malformed"):
        parse_ssh_option("ServerAliveInterval=")


def test_strict_policy_never_trusts_blindly():
    assert normalize_strict_policy("yes", "x") == "yes"
    assert normalize_strict_policy("ask", "x") == "yes"
    assert normalize_strict_policy("no", "x") == "accept-new"  # TOFU at worst, never accept-anything
    with pytest.raises(UsageError):
        normalize_strict_policy("maybe", "x")


def test_listen_addr():
    assert parse_listen_addr("9595") == ("127.0.0.1", 9595)
    assert parse_listen_addr("localhost:1") == ("127.0.0.1", 1)
    assert parse_listen_addr("off") is None


def test_ssh_config_alias_and_precedence(tmp_path):
    config = paramiko.SSHConfig.from_text(
        "Host prod\n  HostName 10.1.2.3\n  User deploy\n  Port 2200\n  IdentityFile ~/.ssh/prod\n"
        "  ProxyJump bastion\n  ServerAliveInterval 7\n  StrictHostKeyChecking accept-new\n"
        "Host bastion\n  HostName 10.9.9.9\n  User jump\n")
    host = resolve_host("prod", config)
    assert (host.name, host.hostname, host.user, host.port) == ("prod", "10.1.2.3", "deploy", 2200)
    assert host.server_alive_interval == 7 and host.strict_host_key_checking == "accept-new"
    assert host.jump is not None and (host.jump.hostname, host.jump.user) == ("10.9.9.9", "jump")
    # The command line wins over the file, as in OpenSSH.
    override = resolve_host("ops@prod", config, options={"ServerAliveInterval": "2"}, port=22, jump="none")
    assert (override.user, override.port, override.server_alive_interval, override.jump) == ("ops", 22, 2.0, None)


def test_proxyjump_chain_order():
    host = resolve_host("target", paramiko.SSHConfig.from_text(""), jump="a,b")
    assert host.jump is not None and host.jump.hostname == "b" and host.jump.jump is not None
    assert host.jump.jump.hostname == "a"


def test_bad_ssh_config_value_is_a_usage_error():
    config = paramiko.SSHConfig.from_text("Host prod\n  ServerAliveInterval often\n")
    with pytest.raises(UsageError, match="ServerAliveInterval"):
        resolve_host("prod", config)
