"""Fixtures of the end-to-end suite; the lab itself is tests/e2e_lab.py."""
from __future__ import annotations

import shutil
from contextlib import ExitStack
from typing import Iterator

import pytest

from e2e_lab import BINARIES, TIME_SCALE, Lab, all_up, start_chain, write_results
from pipeline_host import PipelineHost, traversable_workdir, tunnel_account
from remote_host import RemoteHost, require, wait_until


@pytest.fixture(scope="module")
def lab_host() -> Iterator[tuple[RemoteHost, PipelineHost]]:
    """The production host with the whole reference pipeline, shared by the module's tests."""
    require(BINARIES)
    with ExitStack() as exits:
        workdir = traversable_workdir(prefix="e2e-host-")
        exits.callback(shutil.rmtree, workdir, True)
        host = exits.enter_context(RemoteHost(workdir))
        exits.enter_context(tunnel_account(host))
        host.start_sshd()
        pipe = exits.enter_context(PipelineHost(host, workers=2, task_seconds=0.05))
        pipe.start_load(rate=10)
        exits.callback(write_results)
        yield host, pipe


@pytest.fixture(scope="module")
def lab(lab_host: tuple[RemoteHost, PipelineHost], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The scaled chain (TIME_SCALE), ready: every target up and no alert firing."""
    host, pipe = lab_host
    with ExitStack() as exits:
        lab = start_chain(exits, tmp_path_factory.mktemp("e2e-scaled"), host, pipe, TIME_SCALE)
        wait_until(lambda: all_up(lab), 60, "every scrape target up through the tunnel")
        wait_until(lambda: not lab.firing_alerts(), 60, "no alert firing on the healthy pipeline")
        yield lab


@pytest.fixture
def production_lab(lab_host: tuple[RemoteHost, PipelineHost],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The chain at production settings: 15 s scrapes and evaluations, rules and routes unscaled."""
    host, pipe = lab_host
    with ExitStack() as exits:
        lab = start_chain(exits, tmp_path_factory.mktemp("e2e-production"), host, pipe, 1.0)
        wait_until(lambda: all_up(lab), 90, "every scrape target up through the tunnel")
        yield lab
