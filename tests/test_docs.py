"""The docs cannot rot: every shell block parses, every `tunnel` command in them is accepted by the real
CLI (and builds a config), blocks marked `<!-- doctest: run -->` run for real, YAML examples load.

Annotations, on the line before a fence: `run` (execute it, must exit 0), `demo` (execute it while
`tunnel --demo` runs with its defaults, as a reader trying the docs would), `parse` (the default for sh),
`yaml` (load it with the real fleet-config loader).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import paramiko
import pytest

from agent.cli import config_from_args, parse_args
from agent.yamlconfig import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*/*.md")])
FENCE = re.compile(r"(?:<!-- doctest: (\w+) -->\s*\n\s*)?```(\w+)\n(.*?)```", re.S)
TUNNEL_COMMAND = re.compile(r"^(?:\S*/)?(?:tunnel|python3? tunnel\.py)(?:\s|$)")


@dataclass
class Block:
    file: Path
    line: int
    mode: str
    language: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(language: str) -> list[Block]:
    found = []
    for file in DOCS:
        text = file.read_text()
        for match in FENCE.finditer(text):
            if match.group(2) == language:
                line = text.count("\n", 0, match.start(2)) + 1
                found.append(Block(file, line, match.group(1) or "parse", language,
                                   textwrap.dedent(match.group(3))))
    return found


SH_BLOCKS = blocks("sh")


def tunnel_commands(script: str) -> list[list[str]]:
    """Every invocation of the agent in a shell snippet (split on ; && || |, comments dropped)."""
    commands = []
    for raw in script.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            if TUNNEL_COMMAND.match(part) and not part.startswith("tunnel.py"):
                words = shlex.split(part)
                start = 2 if words[0].startswith("python") else 1
                commands.append(words[start:])
    return commands


@pytest.fixture
def doc_home(tmp_path: Path, monkeypatch) -> Path:
    """A HOME holding what the docs refer to: the fleet config of operations.md, a Flower password."""
    config_dir = tmp_path / ".config" / "tunnel"
    config_dir.mkdir(parents=True)
    (config_dir / "flower.pass").write_text("not-a-real-password\n")
    (config_dir / "flower.pass").chmod(0o600)  # the loader refuses a password file others can read
    fleet = next(b for b in blocks("yaml") if b.mode == "yaml" and b.file.name == "operations.md")
    (config_dir / "hosts.yml").write_text(fleet.text)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def demo_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`tunnel --demo` with its defaults (forwards on 8000..9182, /metrics on 127.0.0.1:9595), up."""
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tunnel.py"), "--demo", "-q"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while b"tunnel_up" not in _fetch("http://127.0.0.1:9595/metrics") or proc.poll() is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tunnel --demo did not come up: {log.read_text()[-800:]}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except OSError:
        return b""


def test_docs_have_shell_examples():
    assert len(SH_BLOCKS) >= 8 and any(b.mode == "run" for b in SH_BLOCKS)


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block: Block, doc_home: Path, request: pytest.FixtureRequest):
    syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.id}: {syntax.stderr}"
    for argv in tunnel_commands(block.text):
        if {"--help", "-h", "--version"} & set(argv):
            continue  # argparse answers these itself; `run` blocks execute them
        args = parse_args([os.path.expanduser(a) if a.startswith("~") else a for a in argv])
        if not args.demo:
            config = config_from_args(args)
            assert config.hosts, f"{block.id}: {argv} resolves to no host"
    if block.mode == "demo":
        request.getfixturevalue("demo_agent")
    if block.mode in ("run", "demo"):
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "HOME": str(doc_home)}
        if not (Path(bin_dir) / "tunnel").exists():  # not pip-installed: run the entry point
            shim = doc_home / "bin" / "tunnel"
            shim.parent.mkdir(exist_ok=True)
            shim.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tunnel.py'} \"$@\"\n")
            shim.chmod(0o755)
            env["PATH"] = f"{shim.parent}:{env['PATH']}"
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"{block.id}: {result.stderr}"


@pytest.mark.parametrize("block", [b for b in blocks("yaml") if b.mode == "yaml"], ids=lambda b: b.id)
def test_yaml_example_loads(block: Block, doc_home: Path):
    path = doc_home / "example.yml"
    path.write_text(block.text)
    config = load_config(path, ssh_config=paramiko.SSHConfig.from_text(""))
    assert config.hosts


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [b.text.strip() for b in SH_BLOCKS if b.file.name == "README.md" and "pytest" in b.text]
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines(), ".ci/run must run the README's test command verbatim"
    assert "tests/debian-packages.txt" in commands[0] and "apt-get install" in commands[0]
    assert "--demo" in readme


def test_debian_packages_exist_in_the_archive_names():
    names = [line.split("#")[0].strip() for line in (ROOT / "tests" / "debian-packages.txt").read_text().splitlines()]
    names = [n for n in names if n]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", n) for n in names) and len(names) == len(set(names))
