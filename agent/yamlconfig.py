"""The YAML config: many hosts in one agent. Every error names the file, line and key, and the fix.

    local_port_range: [19000, 19999]   # for forwards without local_port
    metrics: 127.0.0.1:9595
    sd_file: ~/.local/state/tunnel/targets.json
    defaults:                          # any host key, applied to every host
      identity_file: ~/.ssh/tunnel_ed25519
    hosts:
      - name: prod-1                   # the `host` label
        ssh: tunnel@10.0.0.5:22        # or an ssh_config alias
        jump: bastion
        labels: {env: prod, role: transcription}
        forwards: [api, flower, {name: redis, remote_port: 9121, local_port: 9121}]
        flower_auth: {username: admin, password_file: ~/.config/tunnel/flower.pass}

Forwards default to the five exporters. Local ports not given are assigned from `local_port_range`
in config order, skipping ports another program holds; on reload a forward keeps the port it had, so
Prometheus targets stay put.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import paramiko
import yaml

from .config import (
    DEFAULT_FORWARDS,
    LOOPBACK,
    MAX_CONNECT_WAIT,
    AgentConfig,
    Forward,
    HostConfig,
    parse_listen_addr,
    parse_port,
    validate_ssh_option,
)
from .errors import UsageError
from .forward import port_is_free

DEFAULT_CONFIG_PATHS = ("~/.config/tunnel/hosts.yml", "/etc/tunnel/hosts.yml")
DEFAULT_PORT_RANGE = (19000, 19999)

_TOP_KEYS = {"hosts", "defaults", "local_port_range", "metrics", "sd_file", "sd_host", "probe_interval",
             "connect_wait"}
_HOST_KEYS = {"name", "ssh", "port", "identity_file", "identities_only", "jump", "known_hosts",
              "strict_host_key_checking", "server_alive_interval", "server_alive_count_max", "connect_timeout",
              "labels", "forwards", "flower_auth"}
_FORWARD_KEYS = {"name", "remote_port", "local_port", "remote_host", "bind", "path"}
_AUTH_KEYS = {"username", "password_file", "password_env"}
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: YAML host key -> the ssh -o option it stands for.
_SSH_OPTION_KEYS = {
    "known_hosts": "UserKnownHostsFile", "strict_host_key_checking": "StrictHostKeyChecking",
    "server_alive_interval": "ServerAliveInterval", "server_alive_count_max": "ServerAliveCountMax",
    "connect_timeout": "ConnectTimeout", "identities_only": "IdentitiesOnly",
}

PortMemory = Mapping[tuple[str, str], int]


class _Node:
    """A YAML node with its location, for error messages."""

    def __init__(self, node: yaml.Node, file: str, path: str) -> None:
        self.node, self.file, self.path = node, file, path

    @property
    def where(self) -> str:
        return f"{self.file}:{self.node.start_mark.line + 1}: {self.path}"

    def fail(self, problem: str) -> UsageError:
        return UsageError(f"{self.where} {problem}")

    def mapping(self, allowed: set[str]) -> dict[str, "_Node"]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail(f"must be a mapping of keys ({', '.join(sorted(allowed))})")
        result: dict[str, _Node] = {}
        for key_node, value_node in self.node.value:
            key = key_node.value
            child = _Node(value_node, self.file, f"{self.path}.{key}" if self.path else key)
            if key not in allowed:
                raise UsageError(f"{self.file}:{key_node.start_mark.line + 1}: unknown key {key!r} in "
                                 f"{self.path or 'the top level'}: use one of {', '.join(sorted(allowed))}")
            if key in result:
                raise child.fail("is given twice")
            result[key] = child
        return result

    def sequence(self) -> list["_Node"]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail("must be a list")
        return [_Node(n, self.file, f"{self.path}[{i}]") for i, n in enumerate(self.node.value)]

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail("must be a single value, not a list or mapping")
        return yaml.safe_load(yaml.serialize(self.node))

    def text(self) -> str:
        value = self.scalar()
        if value is None or isinstance(value, (list, dict)):
            raise self.fail("must be a string")
        return str(value)

    def number(self, positive: bool = True, maximum: float = 86400.0) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0) or value > maximum:
            lowest = "above 0" if positive else "0"
            raise self.fail(f"must be a number from {lowest} to {maximum:g}, not {value!r}")
        return float(value)

    def port(self) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"must be a port number 1-65535, not {value!r}")
        try:
            return parse_port(value)
        except UsageError:
            raise self.fail(f"{value} is out of range: use 1-65535") from None

    def flag(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.fail(f"must be true or false, not {value!r}")
        return value


def default_config_path() -> Path | None:
    """The first existing default config file, if any."""
    for candidate in DEFAULT_CONFIG_PATHS:
        path = Path(os.path.expanduser(candidate))
        if path.exists():
            return path
    return None


def load_config(path: str | Path, *, ssh_config: paramiko.SSHConfig, overrides: Mapping[str, object] | None = None,
                options: Mapping[str, str] | None = None, identity_files: tuple[str, ...] = (),
                previous_ports: PortMemory | None = None) -> AgentConfig:
    """Read and validate the YAML file; CLI `overrides` (metrics, sd_file...) win over the file."""
    file = Path(os.path.expanduser(str(path)))
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file {file} does not exist: check the --config path") from None
    except OSError as exc:
        raise UsageError(f"config file {file} is not readable ({exc.strerror}): fix its permissions") from None
    try:
        root_node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{file}{line}: not valid YAML ({problem}): fix the indentation or quoting there") from None
    if root_node is None:
        raise UsageError(f"{file}: the file is empty: list your hosts under `hosts:`")
    return _build(_Node(root_node, str(file), ""), ssh_config, dict(overrides or {}), dict(options or {}),
                  identity_files, previous_ports or {})


def _build(root: _Node, ssh_config: paramiko.SSHConfig, overrides: dict[str, object], options: dict[str, str],
           identity_files: tuple[str, ...], previous_ports: PortMemory) -> AgentConfig:
    top = root.mapping(_TOP_KEYS)
    if "hosts" not in top:
        raise root.fail("has no `hosts:` list: add at least one host (name and ssh)")
    defaults = top["defaults"].mapping(_HOST_KEYS - {"name", "ssh"}) if "defaults" in top else {}
    port_range = _port_range(top.get("local_port_range"))
    hosts_nodes = top["hosts"].sequence()
    if not hosts_nodes:
        raise top["hosts"].fail("is empty: add at least one host")
    hosts = [_host(node, defaults, ssh_config, options, identity_files) for node in hosts_nodes]
    names: dict[str, _Node] = {}
    for host, node in zip(hosts, hosts_nodes, strict=True):
        if host.name in names:
            raise node.fail(f"name {host.name!r} is used twice (also at {names[host.name].where}): "
                            "names must be unique")
        names[host.name] = node
    hosts = _assign_local_ports(hosts, hosts_nodes, port_range, previous_ports)

    settings: dict[str, object] = {}
    if "metrics" in top:
        settings["metrics_addr"] = _wrap(top["metrics"], lambda n: parse_listen_addr(n.text(), "metrics"))
    if "sd_file" in top:
        settings["sd_file"] = Path(os.path.expanduser(top["sd_file"].text()))
    if "sd_host" in top:
        settings["sd_target_host"] = top["sd_host"].text()
    if "probe_interval" in top:
        settings["probe_interval"] = top["probe_interval"].number()
    if "connect_wait" in top:
        settings["connect_wait"] = top["connect_wait"].number(positive=False, maximum=MAX_CONNECT_WAIT)
    settings.update(overrides)
    return AgentConfig(hosts=tuple(hosts), **settings)  # type: ignore[arg-type]


def _wrap(node: _Node, parse: Callable[[_Node], Any]) -> Any:
    try:
        return parse(node)
    except UsageError as exc:
        if str(exc).startswith(node.file):
            raise
        raise node.fail(f"is invalid: {exc}") from None


def _port_range(node: _Node | None) -> tuple[int, int]:
    if node is None:
        return DEFAULT_PORT_RANGE
    items = node.sequence()
    if len(items) != 2:
        raise node.fail("must be [first, last], e.g. [19000, 19999]")
    first, last = items[0].port(), items[1].port()
    if first > last:
        raise node.fail(f"starts after it ends ({first} > {last})")
    return first, last


def _host(node: _Node, defaults: dict[str, _Node], ssh_config: paramiko.SSHConfig, cli_options: dict[str, str],
          cli_identities: tuple[str, ...]) -> HostConfig:
    from .sshconfig import resolve_host

    fields = {**defaults, **node.mapping(_HOST_KEYS)}
    if "ssh" not in fields:
        raise node.fail("has no `ssh:` destination: write ssh: user@host[:port] or an ssh_config alias")
    destination = fields["ssh"].text()
    name = fields["name"].text() if "name" in fields else None
    if name is not None and not _NAME.match(name):
        raise fields["name"].fail(f"{name!r} is not a usable name: letters, digits, '.', '_', '-'")

    options = dict(cli_options)
    for key, option in _SSH_OPTION_KEYS.items():
        if key in fields and option not in options:
            value = fields[key].scalar()
            text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
            try:
                validate_ssh_option(option, text, key)
            except UsageError as exc:
                raise fields[key].fail(f"is invalid: {exc}") from None
            options[option] = text
    identities = list(cli_identities)
    if "identity_file" in fields:
        identity = fields["identity_file"]
        paths = [n.text() for n in identity.sequence()] if isinstance(identity.node, yaml.SequenceNode) \
            else [identity.text()]
        identities += paths
    labels = _labels(fields["labels"]) if "labels" in fields else {}
    forwards = _forwards(fields["forwards"]) if "forwards" in fields else _default_forwards()
    basic_auth = _flower_auth(fields["flower_auth"]) if "flower_auth" in fields else None
    if basic_auth is not None:
        forwards = tuple(replace(f, basic_auth=basic_auth) if f.name == "flower" else f for f in forwards)
    try:
        host = resolve_host(destination, ssh_config, options=options,
                            port=fields["port"].port() if "port" in fields else None,
                            identity_files=identities, jump=fields["jump"].text() if "jump" in fields else None,
                            forwards=forwards, labels=labels, name=name)
    except UsageError as exc:
        raise node.fail(f"is invalid: {exc}") from None
    if name is None and not _NAME.match(host.name):
        raise node.fail(f"needs a `name:` (the host label); {host.name!r} cannot be one")
    return host


def _labels(node: _Node) -> dict[str, str]:
    if not isinstance(node.node, yaml.MappingNode):
        raise node.fail("must be a mapping of label: value")
    labels: dict[str, str] = {}
    for key_node, value_node in node.node.value:
        key = key_node.value
        child = _Node(value_node, node.file, f"{node.path}.{key}")
        if not _LABEL.match(key) or key.startswith("__"):
            raise child.fail(f"label name {key!r} is not a valid Prometheus label name")
        if key in ("job", "instance", "host"):
            raise child.fail(f"label {key!r} is set by the agent: choose another name")
        labels[key] = child.text()
    return labels


def _default_forwards() -> tuple[Forward, ...]:
    return tuple(Forward(name=n, remote_port=p, local_port=0) for n, p in DEFAULT_FORWARDS)


def _forwards(node: _Node) -> tuple[Forward, ...]:
    by_name = dict(DEFAULT_FORWARDS)
    forwards: list[Forward] = []
    seen: dict[str, _Node] = {}
    for item in node.sequence():
        if isinstance(item.node, yaml.ScalarNode):
            name = item.text()
            if name not in by_name:
                raise item.fail(f"{name!r} is not a default forward ({', '.join(by_name)}): "
                                "write {name: ..., remote_port: ...}")
            forward = Forward(name=name, remote_port=by_name[name], local_port=0)
        else:
            fields = item.mapping(_FORWARD_KEYS)
            if "name" not in fields:
                raise item.fail("has no `name:` (it becomes the Prometheus job)")
            name = fields["name"].text()
            if not _LABEL.match(name):
                raise fields["name"].fail(f"{name!r} must be a valid label value like redis or api_v2")
            if "remote_port" in fields:
                remote_port = fields["remote_port"].port()
            elif name in by_name:
                remote_port = by_name[name]
            else:
                raise item.fail(f"has no `remote_port:` ({name!r} is not one of the defaults)")
            forward = Forward(
                name=name, remote_port=remote_port,
                local_port=fields["local_port"].port() if "local_port" in fields else 0,
                remote_host=fields["remote_host"].text() if "remote_host" in fields else LOOPBACK,
                bind=fields["bind"].text() if "bind" in fields else LOOPBACK,
                path=fields["path"].text() if "path" in fields else "/metrics")
        if forward.name in seen:
            raise item.fail(f"forward {forward.name!r} is listed twice (also at {seen[forward.name].where})")
        seen[forward.name] = item
        forwards.append(forward)
    if not forwards:
        raise node.fail("is empty: omit `forwards:` for the five defaults, or list some")
    return tuple(forwards)


def _flower_auth(node: _Node) -> tuple[str, str]:
    fields = node.mapping(_AUTH_KEYS)
    if "username" not in fields:
        raise node.fail("needs `username:`")
    if "password_file" in fields:
        path = Path(os.path.expanduser(fields["password_file"].text()))
        try:
            if path.stat().st_mode & 0o077:
                raise fields["password_file"].fail(f"{path} is readable by other users: chmod 600 {path}")
            password = path.read_text().strip()
        except OSError as exc:
            raise fields["password_file"].fail(f"{path} is not readable ({exc.strerror})") from None
    elif "password_env" in fields:
        variable = fields["password_env"].text()
        if variable not in os.environ:
            raise fields["password_env"].fail(f"environment variable {variable} is not set")
        password = os.environ[variable]
    else:
        raise node.fail("needs `password_file:` or `password_env:` (never a literal password in the config)")
    return fields["username"].text(), password


def _assign_local_ports(hosts: list[HostConfig], nodes: list[_Node], port_range: tuple[int, int],
                        previous: PortMemory) -> list[HostConfig]:
    """Give every forward without local_port a free port of the range; report any collision by line."""
    taken: dict[tuple[str, int], str] = {}
    for host, node in zip(hosts, nodes, strict=True):
        for forward in host.forwards:
            if forward.local_port:
                key = (forward.bind, forward.local_port)
                if key in taken:
                    raise node.fail(f"forward {forward.name} uses local port {forward.local_port}, already used by "
                                    f"{taken[key]}: give one of them another local_port")
                taken[key] = f"{host.name}/{forward.name}"
    used = {port for _, port in taken}
    assigned: dict[tuple[str, str], int] = {}
    for host in hosts:  # first keep the ports forwards had before a reload, then hand out new ones
        for forward in host.forwards:
            port = previous.get((host.name, forward.name))
            if not forward.local_port and port is not None and port not in used \
                    and port_range[0] <= port <= port_range[1]:
                assigned[(host.name, forward.name)] = port
                used.add(port)
    free = (p for p in range(port_range[0], port_range[1] + 1) if p not in used)
    result = []
    for host, node in zip(hosts, nodes, strict=True):
        forwards = []
        for forward in host.forwards:
            if not forward.local_port:
                port = assigned.get((host.name, forward.name)) or next(
                    (p for p in free if port_is_free(forward.bind, p)), None)
                if port is None:
                    raise node.fail(f"local_port_range {port_range[0]}-{port_range[1]} has no free port left for "
                                    f"{host.name}/{forward.name}: widen it")
                used.add(port)
                forward = replace(forward, local_port=port)
            forwards.append(forward)
        result.append(replace(host, forwards=tuple(forwards)))
    return result


def port_memory(config: AgentConfig) -> dict[tuple[str, str], int]:
    """(host, forward) -> local port of a running config, so a reload keeps the ports."""
    return {(h.name, f.name): f.local_port for h in config.hosts for f in h.forwards}
