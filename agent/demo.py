"""`tunnel --demo`: the whole chain on one machine, through the same code path as a real host.

Starts the sample exporters and an in-process SSH server (throwaway ECDSA host key, ephemeral port on
127.0.0.1), writes a throwaway known_hosts holding that key (so strict host-key checking stays on),
then runs the real Agent against it with the default forwards (or the -L ones).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import paramiko

from .app import Agent
from .auth import Identities
from .config import AgentConfig, HostConfig, default_forwards, parse_forward_spec
from .demo_exporters import DemoPipeline
from .demo_server import DemoSSHServer
from .hostkeys import host_pattern

log = logging.getLogger(__name__)
DEMO_HOST = "demo"


def demo_config(args: argparse.Namespace, ssh_port: int, known_hosts: Path) -> AgentConfig:
    """The config the demo runs: one host, the demo SSH server, the default (or -L) forwards."""
    from .cli import agent_options, check_unique_local_ports, sd_options

    forwards = tuple(parse_forward_spec(spec) for spec in args.forwards) or default_forwards()
    check_unique_local_ports(forwards)
    host = HostConfig(name=DEMO_HOST, hostname="127.0.0.1", user="demo", port=ssh_port,
                      known_hosts_files=(str(known_hosts),), global_known_hosts_files=(),
                      strict_host_key_checking="yes", forwards=forwards, labels={"env": "demo"})
    return AgentConfig(hosts=(host,), **sd_options(args), **agent_options(args))  # type: ignore[arg-type]


def run_demo(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the demo until Ctrl-C/SIGTERM; returns the exit status."""
    out = out or sys.stderr
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-demo-"))
    pipeline = DemoPipeline()
    server: DemoSSHServer | None = None
    try:
        ports = pipeline.start()
        host_key, client_key = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
        server = DemoSSHServer(host_key, client_key, ports)
        server.start()
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"{host_pattern('127.0.0.1', server.port)} {host_key.get_name()} "
                               f"{host_key.get_base64()}\n")
        config = demo_config(args, server.port, known_hosts)
        identities = Identities(files=[("demo key (in memory)", client_key)], use_agent=False)
        agent = Agent(config, show_status=not args.quiet, identities=lambda host: identities)
        agent.on_started = lambda: _print_urls(agent, server.port if server else 0, out)
        return agent.run()
    finally:
        if server is not None:
            server.close()
        pipeline.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _print_urls(agent: Agent, ssh_port: int, out: TextIO) -> None:
    lines = [f"demo: in-process SSH server on 127.0.0.1:{ssh_port} (throwaway host key, pinned in a temporary "
             "known_hosts); sample exporters behind it. Open:"]
    for host in agent.config.hosts:
        for forward in host.forwards:
            lines.append(f"  {forward.name:<9} http://{forward.local}/metrics")
    if agent.metrics_url:
        lines.append(f"  {'agent':<9} {agent.metrics_url}")
    if agent.config.sd_file:
        lines.append(f"  file_sd   {agent.config.sd_file}")
    lines.append("Ctrl-C to stop.")
    print("\n".join(lines), file=out, flush=True)
