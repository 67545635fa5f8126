"""Command line: `tunnel [options] [user@]host[:port]`, ssh-like. Parses into an AgentConfig, then runs.

Every error an operator can cause is one line on stderr and exit status 2; no tracebacks.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .config import (
    DEFAULT_METRICS_ADDR,
    MAX_CONNECT_WAIT,
    AgentConfig,
    Forward,
    default_forwards,
    parse_forward_spec,
    parse_listen_addr,
    parse_port,
    parse_ssh_option,
)
from .errors import AgentError, UsageError

log = logging.getLogger("agent")

DESCRIPTION = """Keep SSH local forwards to exporters on a host's 127.0.0.1, reconnecting by itself.
With no -L, forwards 127.0.0.1:8000 (API /metrics), :5555 (Flower), :9187 (postgres_exporter),
:9121 (redis_exporter) and :9182 (windows_exporter) to the same ports on the host's 127.0.0.1."""

EPILOG = """examples:
  tunnel deploy@10.0.0.5                 the five default forwards
  tunnel -J bastion prod-db              through a jump host, alias from ~/.ssh/config
  tunnel -L 19121:127.0.0.1:9121 prod    one forward, another local port
  tunnel --config ~/.config/tunnel/hosts.yml   many hosts
  tunnel --demo                          everything in-process, no remote host needed
  tunnel --check prod                    diagnose, then exit"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see tunnel --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunnel", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("destination", nargs="?", help="[user@]host[:port] or an alias from ssh_config")
    p.add_argument("-p", dest="port", metavar="PORT", help="SSH port of the host (default 22 or ssh_config Port)")
    p.add_argument("-i", dest="identities", action="append", default=[], metavar="IDENTITY_FILE",
                   help="private key to use (repeatable); keys in ssh-agent are tried first")
    p.add_argument("-F", dest="ssh_config", metavar="SSH_CONFIG",
                   help="ssh_config file (default ~/.ssh/config; 'none' for no file)")
    p.add_argument("-J", dest="jump", metavar="[user@]jump[:port]", help="ProxyJump: connect through this host")
    p.add_argument("-L", dest="forwards", action="append", default=[], metavar="[bind:]lport:rhost:rport",
                   help="local forward (repeatable); replaces the five defaults")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="Key=Value",
                   help="ssh option: UserKnownHostsFile, StrictHostKeyChecking (yes|accept-new), "
                        "ServerAliveInterval, ServerAliveCountMax, ConnectTimeout, IdentityFile, ...")
    p.add_argument("--config", metavar="FILE", help="YAML file listing hosts and forwards")
    p.add_argument("--metrics", metavar="ADDR",
                   help="where to serve the agent's own /metrics: [host:]port or off "
                        f"(default {DEFAULT_METRICS_ADDR[0]}:{DEFAULT_METRICS_ADDR[1]})")
    p.add_argument("--sd-file", metavar="PATH", help="write a Prometheus file_sd JSON of every forward here")
    p.add_argument("--sd-host", metavar="ADDR", default=None,
                   help="address Prometheus uses to reach the forwards in --sd-file "
                        "(default 127.0.0.1; host.docker.internal for Docker Desktop)")
    p.add_argument("--connect-wait", type=float, metavar="SECONDS",
                   help="how long a local connection waits for a reconnect before it is closed (default 2)")
    p.add_argument("--demo", action="store_true", help="run against an in-process SSH server and sample exporters")
    p.add_argument("--check", action="store_true", help="diagnose DNS, TCP, SSH, host key, auth and each forward")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: paramiko too)")
    p.add_argument("-q", "--quiet", action="store_true", help="no live status, warnings and errors only")
    p.add_argument("--version", action="version", version=f"tunnel {__version__}")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Turn parsed arguments into an AgentConfig (hosts from the destination or --config)."""
    from .sshconfig import load_ssh_config, resolve_host

    forwards = tuple(parse_forward_spec(spec) for spec in args.forwards) or default_forwards()
    check_unique_local_ports(forwards)
    options = dict(parse_ssh_option(o) for o in args.options)
    port = parse_port(args.port, "-p port") if args.port is not None else None
    common = {**sd_options(args), **agent_options(args)}

    config_file = args.config or (None if args.destination else _default_config())
    if config_file:
        if args.destination:
            raise UsageError("give either a destination or --config, not both")
        for flag, given in (("-L", args.forwards), ("-p", args.port), ("-J", args.jump)):
            if given:
                raise UsageError(f"{flag} cannot be combined with --config: set it per host in {config_file}")
        from .yamlconfig import load_config

        return load_config(config_file, ssh_config=load_ssh_config(args.ssh_config), overrides=common,
                           options=options, identity_files=tuple(args.identities))
    if not args.destination:
        raise UsageError("no destination: run `tunnel [user@]host[:port]`, `tunnel --config FILE` or `tunnel --demo`")
    host = resolve_host(args.destination, load_ssh_config(args.ssh_config), options=options, port=port,
                        identity_files=args.identities, jump=args.jump, forwards=forwards)
    return AgentConfig(hosts=(host,), **common)  # type: ignore[arg-type]


def config_reloader(args: argparse.Namespace) -> Callable[[AgentConfig], AgentConfig] | None:
    """What SIGHUP runs: the YAML file read again (keeping local ports), or None without a file."""
    config_file = args.config or (None if args.destination else _default_config())
    if not config_file:
        return None

    def reload(current: AgentConfig) -> AgentConfig:
        from .sshconfig import load_ssh_config
        from .yamlconfig import load_config, port_memory

        return load_config(config_file, ssh_config=load_ssh_config(args.ssh_config),
                           overrides={**sd_options(args), **agent_options(args)},
                           options=dict(parse_ssh_option(o) for o in args.options),
                           identity_files=tuple(args.identities), previous_ports=port_memory(current))

    return reload


def _default_config() -> str | None:
    from .yamlconfig import default_config_path

    path = default_config_path()
    return str(path) if path else None


def agent_options(args: argparse.Namespace) -> dict[str, object]:
    """--metrics and --connect-wait, when given (otherwise the YAML value or the default applies)."""
    options: dict[str, object] = {}
    if args.metrics is not None:
        options["metrics_addr"] = parse_listen_addr(args.metrics)
    if args.connect_wait is not None:
        if not (math.isfinite(args.connect_wait) and 0 <= args.connect_wait <= MAX_CONNECT_WAIT):
            raise UsageError(f"--connect-wait {args.connect_wait:g} must be 0-{MAX_CONNECT_WAIT:g} seconds")
        options["connect_wait"] = args.connect_wait
    return options


def sd_options(args: argparse.Namespace) -> dict[str, object]:
    """The file_sd settings given on the command line (only those given, so YAML values stay)."""
    options: dict[str, object] = {}
    if args.sd_file:
        options["sd_file"] = _path(args.sd_file)
    if args.sd_host:
        options["sd_target_host"] = args.sd_host
    return options


def check_unique_local_ports(forwards: Sequence[Forward]) -> None:
    """Two -L forwards may not share a local address."""
    seen: dict[tuple[str, int], str] = {}
    for forward in forwards:
        key = (forward.bind, forward.local_port)
        if key in seen:
            raise UsageError(f"local port {forward.local} is given twice (-L {seen[key]} and -L for "
                             f"{forward.remote}): use a different local port for one of them")
        seen[key] = forward.remote


def _path(value: str | None) -> Path | None:
    return Path(os.path.expanduser(value)) if value else None


def setup_logging(verbose: int, quiet: bool, interactive_status: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    if interactive_status and not verbose:
        level = logging.ERROR  # the live table shows states and last errors; keep it readable
    logging.basicConfig(level=level, format="tunnel: %(message)s" if not verbose else
                        "%(asctime)s %(threadName)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tunnel` and `python tunnel.py`; returns the exit status."""
    args = None
    try:
        args = parse_args(argv)
        interactive = not args.quiet and not args.check and sys.stderr.isatty()
        setup_logging(args.verbose, args.quiet, interactive)
        if args.demo:
            from .demo import run_demo

            return run_demo(args)
        config = config_from_args(args)
        if args.check:
            from .check import run_check

            return run_check(config)
        from .app import Agent

        agent = Agent(config, show_status=not args.quiet, reload_config=config_reloader(args))
        return agent.run()
    except AgentError as exc:
        print(f"tunnel: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for the operator, unless asked for with -v
        if args is not None and args.verbose:
            raise
        print(f"tunnel: internal error: {type(exc).__name__}: {exc} (run with -v for details and report it)",
              file=sys.stderr)
        return 1
