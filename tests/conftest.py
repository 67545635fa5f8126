"""Shared fixtures: a namespace "remote host" with real sshd, and the agent run as its real CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from remote_host import RemoteHost, require

NETNS_BINARIES = ("ip", "/usr/sbin/sshd", "ssh-keygen", "iptables")


@pytest.fixture
def remote_host(tmp_path: Path) -> Iterator[RemoteHost]:
    """A started namespace host (sshd on its veth address, nothing on its 127.0.0.1 yet)."""
    require(NETNS_BINARIES)
    with RemoteHost(tmp_path / "host") as host:
        host.start_sshd()
        yield host


@pytest.fixture
def make_remote_host(tmp_path: Path) -> Iterator:
    """Factory for extra hosts (jump hosts, fleets); all are closed at teardown."""
    require(NETNS_BINARIES)
    hosts: list[RemoteHost] = []

    def make(start: bool = True, **kwargs: object) -> RemoteHost:
        host = RemoteHost(tmp_path / f"host{len(hosts) + 1}", **kwargs)  # type: ignore[arg-type]
        hosts.append(host)
        if start:
            host.start_sshd()
        return host

    yield make
    for host in reversed(hosts):
        host.close()
