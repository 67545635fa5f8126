"""Typed configuration: what to connect to and what to forward, plus the parsers for ssh-like specs.

The CLI and the YAML loader turn raw input into these frozen dataclasses; the core never sees argv.
Every parser raises UsageError with one line that names the bad value and how to write it.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import UsageError

log = logging.getLogger(__name__)

#: The five exporters of the monitored pipeline, each forwarded to the same port on the host's 127.0.0.1.
DEFAULT_FORWARDS: tuple[tuple[str, int], ...] = (
    ("api", 8000),  # the API's own /metrics
    ("flower", 5555),  # Celery Flower (UI and /metrics)
    ("postgres", 9187),  # postgres_exporter
    ("redis", 9121),  # redis_exporter
    ("windows", 9182),  # windows_exporter
)
LOOPBACK = "127.0.0.1"
DEFAULT_METRICS_ADDR = (LOOPBACK, 9595)
STRICT_POLICIES = ("yes", "accept-new")
MAX_CONNECT_WAIT = 300.0  # seconds a local connection may wait for a reconnect (--connect-wait)


@dataclass(frozen=True)
class Forward:
    """One local port forward: bind:local_port on this machine -> remote_host:remote_port on the host."""

    name: str
    remote_port: int
    local_port: int
    bind: str = LOOPBACK
    remote_host: str = LOOPBACK  # PermitOpen matches this string exactly: 127.0.0.1, not localhost
    path: str = "/metrics"  # what the health probe and --check fetch
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def local(self) -> str:
        return f"{self.bind}:{self.local_port}"

    @property
    def remote(self) -> str:
        return f"{self.remote_host}:{self.remote_port}"


@dataclass(frozen=True)
class HostConfig:
    """Everything needed to reach one host and keep its forwards (OpenSSH option names in comments)."""

    name: str  # what the operator typed or named it in the config; the `host` label
    hostname: str  # HostName
    user: str  # User
    port: int = 22  # Port
    identity_files: tuple[str, ...] = ()  # IdentityFile / -i
    identities_only: bool = False  # IdentitiesOnly: do not offer ssh-agent keys
    jump: "HostConfig | None" = None  # ProxyJump / -J
    known_hosts_files: tuple[str, ...] = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
    global_known_hosts_files: tuple[str, ...] = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    strict_host_key_checking: str = "yes"  # StrictHostKeyChecking: yes | accept-new
    server_alive_interval: float = 5.0  # ServerAliveInterval (s): a keepalive when this long quiet
    server_alive_count_max: int = 3  # ServerAliveCountMax: dead after this many unanswered
    connect_timeout: float = 10.0  # ConnectTimeout (s): TCP connect + SSH handshake
    forwards: tuple[Forward, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def destination(self) -> str:
        port = "" if self.port == 22 else f":{self.port}"
        return f"{self.user}@{self.hostname}{port}"

    @property
    def dead_after(self) -> float:
        """Seconds without a keepalive reply after which the link is declared dead."""
        return self.server_alive_interval * self.server_alive_count_max

    def replace(self, **changes: object) -> "HostConfig":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent: hosts plus the agent's own endpoints."""

    hosts: tuple[HostConfig, ...]
    metrics_addr: tuple[str, int] | None = DEFAULT_METRICS_ADDR
    sd_file: Path | None = None  # Prometheus file_sd JSON the agent keeps up to date
    sd_target_host: str = LOOPBACK  # the address Prometheus uses to reach the forwards
    probe_interval: float = 15.0
    connect_wait: float = 2.0  # how long a local connection waits for a reconnect before it is closed

    def all_forwards(self) -> list[tuple[HostConfig, Forward]]:
        return [(h, f) for h in self.hosts for f in h.forwards]


def default_forwards(bind: str = LOOPBACK) -> tuple[Forward, ...]:
    return tuple(Forward(name=n, remote_port=p, local_port=p, bind=bind) for n, p in DEFAULT_FORWARDS)


# -- parsers for ssh-like command-line specs ----------------------------------------------------------

_HOSTNAME = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]+\])$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._@\\-]{0,63}$")


def parse_port(value: object, what: str = "port") -> int:
    """A TCP port 1-65535, from an int or a decimal string."""
    text = str(value).strip()
    if not text.isdigit():
        raise UsageError(f"{what} {value!r} is not a number: use 1-65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise UsageError(f"{what} {port} is out of range: use 1-65535")
    return port


def parse_destination(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` -> (user, host, port). IPv6 literals go in brackets: [::1]:2222."""
    if not spec or spec.strip() != spec or " " in spec:
        raise UsageError(f"destination {spec!r} is malformed: write [user@]host[:port], e.g. deploy@10.0.0.5")
    user: str | None = None
    rest = spec
    if "@" in spec:
        user, rest = spec.rsplit("@", 1)
        if not _USER.match(user):
            raise UsageError(f"user {user!r} in {spec!r} is malformed: write [user@]host[:port]")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest.partition("]")
        host += "]"
        if tail:
            if not tail.startswith(":"):
                raise UsageError(f"destination {spec!r} is malformed: write [user@][ipv6]:port")
            port = parse_port(tail[1:], f"port in {spec!r}")
        host = host[1:-1]
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = parse_port(port_text, f"port in {spec!r}")
    else:
        host = rest
    if not host or not (_HOSTNAME.match(host) or ":" in host):
        raise UsageError(f"host {host!r} in {spec!r} is malformed: write [user@]host[:port]")
    return user, host, port


def parse_forward_spec(spec: str, index: int = 0) -> Forward:
    """`-L [bind:]lport:rhost:rport` (OpenSSH syntax) -> Forward named after the remote port."""
    parts = _split_colons(spec)
    if len(parts) == 3:
        bind, (lport, rhost, rport) = LOOPBACK, parts
    elif len(parts) == 4:
        bind, lport, rhost, rport = parts
        bind = bind or LOOPBACK
    else:
        raise UsageError(f"-L {spec!r} is malformed: write [bind:]localport:remotehost:remoteport, "
                         "e.g. -L 9121:127.0.0.1:9121")
    if bind == "localhost":
        bind = LOOPBACK
    if not rhost:
        raise UsageError(f"-L {spec!r} has no remote host: write e.g. -L 9121:127.0.0.1:9121")
    local_port = parse_port(lport, f"local port in -L {spec!r}")
    remote_port = parse_port(rport, f"remote port in -L {spec!r}")
    name = next((n for n, p in DEFAULT_FORWARDS if p == remote_port), f"port{remote_port}")
    return Forward(name=name, remote_port=remote_port, local_port=local_port, bind=bind, remote_host=rhost)


def _split_colons(spec: str) -> list[str]:
    """Split on colons, keeping [bracketed] IPv6 addresses whole."""
    parts, current, depth = [], "", 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == ":" and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [p[1:-1] if p.startswith("[") and p.endswith("]") else p for p in parts]


#: The `-o` options we understand, with OpenSSH's spelling.
SSH_OPTIONS = (
    "UserKnownHostsFile", "StrictHostKeyChecking", "ServerAliveInterval", "ServerAliveCountMax",
    "ConnectTimeout", "IdentityFile", "IdentitiesOnly", "User", "Port", "HostName", "ProxyJump",
)
_OPTION_BY_LOWER = {o.lower(): o for o in SSH_OPTIONS}


def parse_ssh_option(spec: str) -> tuple[str, str]:
    """`-o Key=Value` or `-o "Key Value"` -> (canonical Key, Value), validated."""
    match = re.match(r"^\s*([A-Za-z]+)\s*(?:=|\s)\s*(.*?)\s*$", spec)
    if not match or not match.group(2):
        raise UsageError(f"-o {spec!r} is malformed: write -o Key=Value, e.g. -o ServerAliveInterval=5")
    key = _OPTION_BY_LOWER.get(match.group(1).lower())
    if key is None:
        raise UsageError(f"-o {match.group(1)} is not supported: use one of {', '.join(SSH_OPTIONS)}")
    value = match.group(2)
    validate_ssh_option(key, value, f"-o {key}")
    return key, value


def validate_ssh_option(key: str, value: str, where: str) -> None:
    """Check one option's value the way OpenSSH would; raise a one-line UsageError otherwise."""
    if key in ("ServerAliveInterval", "ConnectTimeout"):
        if not re.fullmatch(r"\d+(\.\d+)?", value) or float(value) <= 0:
            raise UsageError(f"{where}={value} must be a positive number of seconds")
    elif key == "ServerAliveCountMax":
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"{where}={value} must be a whole number >= 1")
    elif key == "Port":
        parse_port(value, where)
    elif key == "StrictHostKeyChecking":
        normalize_strict_policy(value, where)
    elif key == "IdentitiesOnly" and value.lower() not in ("yes", "no"):
        raise UsageError(f"{where}={value} must be yes or no")


def normalize_strict_policy(value: str, where: str) -> str:
    """Map OpenSSH's StrictHostKeyChecking values onto the two policies this agent offers.

    An unknown host key is never trusted silently: `no`/`off` (which OpenSSH would accept blindly) are
    treated as `accept-new` (trust on first use, recorded in known_hosts; a changed key is still refused).
    `ask` has no one to ask in a daemon, so it is `yes`.
    """
    lowered = value.strip().lower()
    if lowered in ("yes", "ask", "true"):
        return "yes"
    if lowered == "accept-new":
        return "accept-new"
    if lowered in ("no", "off", "false"):
        log.warning("%s=%s: an unknown host key is never trusted blindly here; treating it as accept-new "
                    "(first key recorded in known_hosts, a changed key refused)", where, value)
        return "accept-new"
    raise UsageError(f"{where}={value} is not valid: use yes (default) or accept-new")


def warn_if_exposed(bind: str, what: str) -> None:
    """A listener beyond loopback puts production data on the laptop's network: say so, loudly."""
    if bind not in (LOOPBACK, "localhost", "::1") and not bind.startswith("127."):
        log.warning("%s listens on %s, not 127.0.0.1: anyone on this machine's networks can read it; "
                    "bind to 127.0.0.1 unless that is what you want", what, bind or "all addresses")


def parse_listen_addr(spec: str, what: str = "--metrics") -> tuple[str, int] | None:
    """`[host:]port`, or `off` -> (host, port) or None. Host defaults to 127.0.0.1."""
    if spec.lower() in ("off", "none", "no"):
        return None
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or LOOPBACK
    if host == "localhost":
        host = LOOPBACK
    address = host, parse_port(port, f"{what} port in {spec!r}")
    warn_if_exposed(host, what)
    return address
