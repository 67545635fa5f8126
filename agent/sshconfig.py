"""Resolve a destination the way OpenSSH does: command-line options first, then ~/.ssh/config (or -F).

Honoured ssh_config keywords: Host aliases, HostName, User, Port, IdentityFile, IdentitiesOnly,
ProxyJump, UserKnownHostsFile, GlobalKnownHostsFile, StrictHostKeyChecking, ServerAliveInterval,
ServerAliveCountMax, ConnectTimeout. As in OpenSSH the first value obtained wins, so `-o`, `-p`,
`-J` override the file, and `-i` identities are tried before the file's IdentityFile lines.
"""
from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Mapping, Sequence

import paramiko

from .config import (
    HostConfig,
    Forward,
    normalize_strict_policy,
    parse_destination,
    parse_port,
    validate_ssh_option,
)
from .errors import UsageError

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
MAX_JUMP_HOPS = 8


def load_ssh_config(path: str | None) -> paramiko.SSHConfig:
    """Read an ssh_config file. `-F none` means no file; an explicit missing file is a usage error."""
    if path == "none":
        return paramiko.SSHConfig()
    explicit = path is not None
    file = Path(os.path.expanduser(path or DEFAULT_SSH_CONFIG))
    if not file.exists():
        if explicit:
            raise UsageError(f"ssh config file {file} does not exist: check the -F path (or use -F none)")
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(file))
    except PermissionError:
        raise UsageError(f"ssh config file {file} is not readable: fix its permissions") from None
    except IsADirectoryError:
        raise UsageError(f"ssh config file {file} is a directory: give -F a file (or -F none)") from None
    except OSError as exc:
        raise UsageError(f"ssh config file {file} cannot be read ({exc.strerror}): check the -F path") from None
    except (paramiko.ConfigParseError, ValueError, IndexError) as exc:
        raise UsageError(f"ssh config file {file} cannot be parsed ({exc}): fix the line or use -F none") from None


def resolve_host(
    destination: str,
    ssh_config: paramiko.SSHConfig,
    *,
    options: Mapping[str, str] | None = None,
    port: int | None = None,
    identity_files: Sequence[str] = (),
    jump: str | None = None,
    forwards: Sequence[Forward] = (),
    labels: Mapping[str, str] | None = None,
    name: str | None = None,
    _depth: int = 0,
) -> HostConfig:
    """Build a HostConfig for `[user@]host[:port]` or an ssh_config alias."""
    if _depth > MAX_JUMP_HOPS:
        raise UsageError(f"ProxyJump chain for {destination!r} is longer than {MAX_JUMP_HOPS} hops (a loop?)")
    options = dict(options or {})
    user, alias, dest_port = parse_destination(destination)
    found = ssh_config.lookup(alias)

    def pick(key: str, default: str | None = None) -> str | None:
        if key in options:
            validate_ssh_option(key, options[key], f"-o {key}")
            return options[key]
        value = found.get(key.lower())
        if value is not None:
            validate_ssh_option(key, str(value), f"ssh_config {key}")
        return value if value is not None else default

    hostname = options.get("HostName") or found.get("hostname") or alias
    user = user or options.get("User") or found.get("user") or _local_user()
    resolved_port = port or dest_port or parse_port(pick("Port", "22"), f"Port for {alias}")

    identities = [*identity_files]
    if "IdentityFile" in options:
        identities.append(options["IdentityFile"])
    identities += [p for p in found.get("identityfile", []) if p not in identities]
    identities_only = (pick("IdentitiesOnly", "no") or "no").lower() == "yes"

    known = pick("UserKnownHostsFile")
    global_known = found.get("globalknownhostsfile")
    policy = normalize_strict_policy(pick("StrictHostKeyChecking", "yes") or "yes",
                                     "StrictHostKeyChecking")

    if jump is not None and not jump.strip():
        raise UsageError("-J needs a jump host: write -J [user@]jump[:port] (or leave -J out)")
    proxy_command = found.get("proxycommand")
    if proxy_command and proxy_command.lower() != "none" and not (jump or options.get("ProxyJump")
                                                                   or found.get("proxyjump")):
        raise UsageError(f"ssh config for {alias} uses ProxyCommand, which tunnel does not run: write "
                         "ProxyJump (or -J) for a jump host, or use -F none to ignore that config")
    jump_spec = jump or options.get("ProxyJump") or found.get("proxyjump")
    jump_host = None
    if jump_spec and jump_spec.lower() != "none":
        jump_host = _resolve_jump_chain(jump_spec, ssh_config, _depth)

    defaults = HostConfig(name="", hostname="", user="")
    return HostConfig(
        name=name or alias,
        hostname=hostname,
        user=user,
        port=resolved_port,
        identity_files=tuple(identities),
        identities_only=identities_only,
        jump=jump_host,
        known_hosts_files=tuple(known.split()) if known else defaults.known_hosts_files,
        global_known_hosts_files=(tuple(global_known.split()) if global_known
                                  else defaults.global_known_hosts_files),
        strict_host_key_checking=policy,
        server_alive_interval=float(pick("ServerAliveInterval", "5") or 5),
        server_alive_count_max=int(pick("ServerAliveCountMax", "3") or 3),
        connect_timeout=float(pick("ConnectTimeout", "10") or 10),
        forwards=tuple(forwards),
        labels=dict(labels or {}),
    )


def _resolve_jump_chain(spec: str, ssh_config: paramiko.SSHConfig, depth: int) -> HostConfig:
    """`-J a,b` means: reach b through a, then the target through b (as OpenSSH does)."""
    hops = [h.strip() for h in spec.split(",") if h.strip()]
    if not hops:
        raise UsageError(f"ProxyJump {spec!r} is empty: write -J [user@]jumphost[:port]")
    previous: HostConfig | None = None
    for hop in hops:
        resolved = resolve_host(hop, ssh_config, _depth=depth + 1)
        # A hop's own ProxyJump applies only to the first hop, as in OpenSSH.
        previous = resolved if previous is None else resolved.replace(jump=previous)
    assert previous is not None
    return previous


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


def expand(path: str) -> Path:
    return Path(os.path.expanduser(path))
