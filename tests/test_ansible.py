"""ansible/: lint, syntax, every task's module arguments, the sshd templates under a real sshd, and a live run.

Static (Windows and Linux): ansible-lint with the production profile, --syntax-check and --list-tasks of every
playbook, each task's arguments against `ansible-doc -j` of its module, argument_specs against defaults, and
the templates rendered by Ansible itself then checked by a real `sshd -t` / `sshd -T -C user=...`.

Live (Linux twin only: no Windows host exists here): site.yml applied twice over SSH to a network-namespace
host (tests/remote_host.RemoteHost), the second run must change nothing; then the real agent logs in as the
tunnel account and reaches the exporters the playbook started, while a command, a PTY, a remote forward and a
forward to any other port are refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import paramiko
import pytest
import yaml
from agent_process import AgentProcess, free_port, parse_metrics, wait_fetch
from pipeline_host import _ACCOUNT_LOCK as ACCOUNT_LOCK
from pipeline_host import _ACCOUNT_MARK as ACCOUNT_MARK
from pipeline_host import TUNNEL_USER
from remote_host import SSHD, RemoteHost, keygen, require, wait_until

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
ROLES = ANSIBLE / "roles"
CONTRACT_FRAGMENT = ROOT / "server-side" / "sshd" / "tunnel-account.conf"
CONTRACT_KEYS = ROOT / "server-side" / "sshd" / "authorized_keys.example"
PERMIT_OPEN = "127.0.0.1:8000 127.0.0.1:5555 127.0.0.1:9187 127.0.0.1:9121 127.0.0.1:9182"
TOOLS = ("ansible-playbook", "ansible-doc", SSHD, "ssh-keygen")


def playbooks() -> list[Path]:
    """Every playbook in ansible/ (a YAML list of plays at the top level)."""
    found = []
    for path in sorted(ANSIBLE.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, list) and all(isinstance(p, dict) and ("hosts" in p or "import_playbook" in p)
                                           for p in data):
            found.append(path)
    return found


def ansible_env(home: Path | None = None) -> dict[str, str]:
    """The repository's ansible.cfg, no colour, and (optionally) every Ansible state directory under `home`."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    if home is not None:
        env.update({"ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "local"),
                    "ANSIBLE_REMOTE_TEMP": str(home / "remote"), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp")})
    return env


def run(cmd: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


# --- lint, syntax, task list ----------------------------------------------------------------------------
def test_ansible_lint_production_profile() -> None:
    """ansible-lint 6.13 has profiles: the strictest (production), offline (no Galaxy)."""
    require(["ansible-lint"])
    result = run(["ansible-lint", "--nocolor", "--offline", "--profile", "production"], cwd=ANSIBLE,
                 env=ansible_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Passed with production profile" in result.stdout + result.stderr


def test_every_playbook_passes_syntax_check_and_lists_every_role_task() -> None:
    require(["ansible-playbook"])
    books = playbooks()
    assert [p.name for p in books] == ["site.yml"]
    for book in books:
        for mode in ("--syntax-check", "--list-tasks"):
            result = run(["ansible-playbook", "-i", "inventory/hosts.yml", str(book), mode], cwd=ANSIBLE,
                         env=ansible_env())
            assert result.returncode == 0, f"{book.name} {mode}: {result.stderr[-3000:]}"
        listed = result.stdout
        for role in ("openssh_server", "ssh_firewall", "tunnel_account", "exporters"):
            tasks = list(iter_tasks(ROLES / role / "tasks"))
            dynamic = {t["ansible.builtin.include_tasks"] for t in tasks if "ansible.builtin.include_tasks" in t}
            for task in tasks:
                if "ansible.builtin.import_tasks" in task or task["__file__"].name in dynamic:
                    continue  # an import is replaced by its tasks; an include's tasks appear only at run time
                assert f"{role} : {task['name']}" in listed, f"{role}: task {task['name']!r} not listed"


# --- module arguments against ansible-doc ---------------------------------------------------------------
def iter_tasks(directory: Path) -> Iterator[dict]:
    """Every task (blocks flattened) of every YAML file under `directory`."""
    for path in sorted(directory.rglob("*.yml")):
        yield from _flatten(yaml.safe_load(path.read_text()) or [], path)


def _flatten(tasks: list, path: Path) -> Iterator[dict]:
    for task in tasks:
        task = {**task, "__file__": path}
        if "block" in task:
            for section in ("block", "rescue", "always"):
                yield from _flatten(task.get(section) or [], path)
        else:
            yield task


@pytest.fixture(scope="module")
def keywords() -> set[str]:
    """Playbook keywords (task, block, play) as Ansible itself lists them."""
    require(["ansible-doc"])
    result = run(["ansible-doc", "-t", "keyword", "-l", "-j"])
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout)) | {"__file__", "local_action", "listen"}


def all_tasks() -> list[dict]:
    tasks: list[dict] = []
    for role in sorted(ROLES.iterdir()):
        for sub in ("tasks", "handlers"):
            tasks.extend(iter_tasks(role / sub))
    for book in playbooks():
        for play in yaml.safe_load(book.read_text()):
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                tasks.extend(_flatten(play.get(section) or [], book))
    return tasks


def test_every_task_argument_is_a_documented_option_of_its_module(keywords: set[str]) -> None:
    """Lint cannot run a Windows module; its doc says which arguments exist and which are required."""
    tasks = all_tasks()
    modules: dict[str, tuple[dict, dict]] = {}
    for task in tasks:
        names = [k for k in task if k not in keywords]
        assert len(names) == 1, f"{task['__file__'].name}: {task.get('name')!r} has modules {names}"
        task["__module__"] = names[0]
    wanted = sorted({t["__module__"] for t in tasks})
    assert all(name.count(".") == 2 for name in wanted), f"not fully qualified: {wanted}"
    assert any(name.startswith("ansible.windows.") for name in wanted)
    assert any(name.startswith("community.windows.") for name in wanted)
    result = run(["ansible-doc", "-j", *wanted])
    assert result.returncode == 0, result.stderr
    docs = json.loads(result.stdout)
    assert sorted(docs) == wanted, f"ansible-doc does not know {set(wanted) - set(docs)}"
    for name, entry in docs.items():
        options = entry["doc"].get("options") or {}
        accepted = dict(options)
        for option, spec in options.items():
            for alias in spec.get("aliases") or []:
                accepted[alias] = spec
        modules[name] = (options, accepted)

    checked = 0
    for task in tasks:
        module, where = task["__module__"], f"{task['__file__'].relative_to(ANSIBLE)}: {task.get('name')!r}"
        options, accepted = modules[module]
        args = task[module]
        free_form = [o for o in options if o in ("free_form", "free-form", "_raw_params", "key_value")]
        if args is None:
            args = {}
        if isinstance(args, str):
            assert free_form, f"{where}: {module} takes no free-form argument"
            continue
        if module == "ansible.builtin.set_fact":  # its arguments are the facts it sets
            assert all(k == "cacheable" or re.match(r"^[a-z_][a-z0-9_]*$", k) for k in args), where
            continue
        for key, value in args.items():
            assert key in accepted, f"{where}: {module} has no option {key!r} (it has {sorted(options)})"
            choices = accepted[key].get("choices")
            if choices and isinstance(value, (str, bool, int)) and "{{" not in str(value):
                assert value in choices, f"{where}: {module} {key}={value!r} not in {choices}"
        for option, spec in options.items():
            if spec.get("required"):
                names = [option, *(spec.get("aliases") or [])]
                assert any(n in args for n in names), f"{where}: {module} needs {option!r}"
        checked += 1
    assert checked >= 60, checked


def test_argument_specs_describe_every_default_and_variables_are_role_prefixed() -> None:
    for role in sorted(ROLES.iterdir()):
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
        spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]
        options = spec["options"]
        assert set(defaults) == set(options), f"{role.name}: defaults {set(defaults) ^ set(options)} differ"
        for name in defaults:
            assert name.startswith(role.name + "_"), f"{role.name}: {name} is not prefixed"
        for name, option in options.items():
            assert option.get("description"), f"{role.name}: {name} undocumented"
            if "default" in option and "{{" not in str(defaults[name]):
                assert option["default"] == defaults[name], f"{role.name}: {name} default differs from spec"
        for sub in ("tasks/main.yml", "tasks/preflight.yml", "meta/main.yml"):
            assert (role / sub).is_file(), f"{role.name}: no {sub}"
        # tunnel_account notifies openssh_server's "restart sshd" (one sshd, one handler).
        assert (role / "handlers" / "main.yml").is_file() or role.name == "tunnel_account", role.name
        internal = set(re.findall(r"(?<![\w*])(_[a-z]+(?:_[a-z0-9]+)+)\b",
                                  "".join(p.read_text() for p in role.rglob("*.yml"))))
        for name in internal:
            assert name.startswith((f"_{role.name}_", "_openssh_server_")), \
                f"{role.name}: internal variable {name} lacks the _{role.name}_ prefix"


def test_requirements_pin_the_collections_and_packages_in_use() -> None:
    collections = {c["name"]: c["version"] for c in
                   yaml.safe_load((ANSIBLE / "requirements.yml").read_text())["collections"]}
    used = {".".join(t["__module__"].split(".")[:2]) for t in _tasks_with_modules()}
    assert used - {"ansible.builtin"} <= set(collections), used
    assert all(re.match(r"^\d+\.\d+\.\d+$", v) for v in collections.values()), collections
    pins = [line for line in (ANSIBLE / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all("==" in line for line in pins), pins
    listed = run(["ansible-galaxy", "collection", "list", "--format", "json"], env=ansible_env())
    if listed.returncode == 0:
        installed = {name: info["version"] for path in json.loads(listed.stdout).values()
                     for name, info in path.items()}
        for name, version in collections.items():
            assert installed.get(name) == version, f"{name}: pinned {version}, installed {installed.get(name)}"


def _tasks_with_modules() -> list[dict]:
    keys = set(json.loads(run(["ansible-doc", "-t", "keyword", "-l", "-j"]).stdout)) | {"__file__", "listen"}
    tasks = all_tasks()
    for task in tasks:
        task["__module__"] = next(k for k in task if k not in keys)
    return tasks


def test_windows_exporter_and_compose_follow_the_server_side_settings() -> None:
    """The MSI properties repeat server-side/windows/windows_exporter.yml; compose publishes on loopback only."""
    defaults = yaml.safe_load((ROLES / "exporters" / "defaults" / "main.yml").read_text())
    settings_path = ROOT / "server-side" / "windows" / "windows_exporter.yml"
    settings = yaml.safe_load(settings_path.read_text())
    assert defaults["exporters_windows_exporter_collectors"] == settings["collectors"]["enabled"].split(",")
    assert settings["web"]["listen-address"] == (f"{defaults['exporters_windows_exporter_listen_address']}:"
                                                 f"{defaults['exporters_windows_exporter_port']}")
    assert defaults["exporters_windows_exporter_config_src"].endswith("/../server-side/windows/windows_exporter.yml")
    version = tuple(int(p) for p in defaults["exporters_windows_exporter_version"].split("."))
    assert version < (0, 31) or "cs" not in defaults["exporters_windows_exporter_collectors"], \
        "windows_exporter 0.31 removed the cs collector: its service would not start"
    compose = yaml.safe_load((ROOT / "server-side" / "compose.yaml").read_text())
    assert defaults["exporters_windows_compose_src"].endswith("/../server-side/compose.yaml")
    published = [str(port) for service in compose["services"].values() for port in service.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    assert sorted(int(p.split(":")[1]) for p in published) == sorted(defaults["exporters_windows_compose_ports"])
    assert set(defaults["exporters_loopback_ports"]) == {8000, 5555, 9187, 9121, 9182}


# --- templates rendered by Ansible, checked by a real sshd ---------------------------------------------
RENDER_PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {defaults}
    - {ssh_firewall_defaults}
  tasks:
    - name: Linux fragment, defaults
      ansible.builtin.template:
        src: {templates}/tunnel-account.conf.j2
        dest: {out}/linux.conf
        mode: "0644"
      vars:
        _tunnel_account_force_command: "{{{{ tunnel_account_force_command }}}}"
    - name: Linux authorized_keys, defaults
      ansible.builtin.template:
        src: {templates}/authorized_keys.j2
        dest: {out}/authorized_keys
        mode: "0644"
      vars:
        _tunnel_account_force_command: "{{{{ tunnel_account_force_command }}}}"
        tunnel_account_authorized_keys: ["{key}"]
    - name: Windows authorized_keys, defaults
      ansible.builtin.template:
        src: {templates}/authorized_keys.j2
        dest: {out}/authorized_keys.windows
        mode: "0644"
      vars:
        _tunnel_account_force_command: "{{{{ tunnel_account_windows_force_command }}}}"
        tunnel_account_authorized_keys: ["{key}"]
    - name: Windows sshd_config (OpenSSH >= 7.8 and 7.7)
      ansible.builtin.template:
        src: {templates}/sshd_config.windows.j2
        dest: "{out}/windows-{{{{ item }}}}.conf"
        mode: "0644"
      vars:
        _tunnel_account_force_command: "{{{{ tunnel_account_windows_force_command }}}}"
        _tunnel_account_keys_file: "{{{{ tunnel_account_windows_authorized_keys_file }}}}"
        _tunnel_account_legacy: "{{{{ item == 'legacy' }}}}"
      loop: [current, legacy]
    - name: nftables table limited to two networks
      ansible.builtin.template:
        src: {firewall_templates}/tunnel-ssh.nft.j2
        dest: {out}/tunnel-ssh.nft
        mode: "0644"
      vars:
        ssh_firewall_remote_ips: [198.51.100.0/24, "2001:db8::/32"]
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tunnel_account (and ssh_firewall) templates rendered by ansible's template module."""
    require(TOOLS)
    out = tmp_path_factory.mktemp("rendered")
    key = keygen(out / "agent_key")
    book = out / "render.yml"
    book.write_text(RENDER_PLAYBOOK.format(
        defaults=ROLES / "tunnel_account" / "defaults" / "main.yml",
        ssh_firewall_defaults=ROLES / "ssh_firewall" / "defaults" / "main.yml",
        key=Path(f"{key}.pub").read_text().strip(), templates=ROLES / "tunnel_account" / "templates",
        firewall_templates=ROLES / "ssh_firewall" / "templates", out=out))
    result = run(["ansible-playbook", "-i", "localhost,", str(book)], env=ansible_env(out / "ansible-home"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def effective(config_text: str, workdir: Path, user: str = "tunnel") -> dict[str, str]:
    """`sshd -t` then `sshd -T -C user=...` of `config_text` (after a minimal base configuration)."""
    host_key = workdir / "host_key"
    if not host_key.exists():
        keygen(host_key)
    config = workdir / f"sshd_config.{abs(hash(config_text))}"
    config.write_text(f"HostKey {host_key}\nPidFile none\nUsePAM no\n{config_text}")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    checked = run([SSHD, "-t", "-f", str(config)])
    assert checked.returncode == 0, f"sshd -t rejects:\n{config.read_text()}\n{checked.stderr}"
    dump = run([SSHD, "-T", "-f", str(config), "-C", f"user={user},host=x,addr=127.0.0.1"])
    assert dump.returncode == 0, dump.stderr
    settings: dict[str, str] = {}
    for line in dump.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings[key] = value if key not in settings else settings[key] + "\n" + value
    return settings


def test_linux_fragment_equals_the_server_side_contract_under_sshd(rendered: Path, tmp_path: Path) -> None:
    assert CONTRACT_FRAGMENT.is_file(), "server-side/sshd/tunnel-account.conf (the contract) is missing"
    ours = effective((rendered / "linux.conf").read_text(), tmp_path)
    contract = effective(CONTRACT_FRAGMENT.read_text(), tmp_path)
    assert ours == contract, {k: (ours.get(k), contract.get(k)) for k in set(ours) | set(contract)
                              if ours.get(k) != contract.get(k)}
    assert ours["permitopen"] == PERMIT_OPEN
    assert ours["allowtcpforwarding"] == "local"
    assert ours["permittty"] == "no"
    assert ours["permitlisten"] == "none"
    assert ours["forcecommand"] == "/bin/false"
    for key in ("x11forwarding", "allowagentforwarding", "allowstreamlocalforwarding", "permittunnel",
                "gatewayports", "permituserrc"):
        assert ours[key] == "no", key
    other = effective((rendered / "linux.conf").read_text(), tmp_path, user="someone-else")
    assert other["allowtcpforwarding"] == "yes" and other["permitopen"] == "any" and other["forcecommand"] == "none"


def test_authorized_keys_carry_the_contract_options(rendered: Path) -> None:
    lines = [line for line in (rendered / "authorized_keys").read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(lines) == 1
    contract = next(line for line in CONTRACT_KEYS.read_text().splitlines() if line and not line.startswith("#"))
    assert lines[0].split(" ssh-ed25519 ")[0] == contract.split(" ssh-ed25519 ")[0]
    for name in ("authorized_keys", "authorized_keys.windows"):
        listed = run(["ssh-keygen", "-l", "-f", str(rendered / name)])
        assert listed.returncode == 0 and "ED25519" in listed.stdout, listed.stderr
    windows = (rendered / "authorized_keys.windows").read_text()
    assert 'command="cmd.exe /c exit 1" ssh-ed25519 ' in windows and windows.count('permitopen="') == 5


@pytest.mark.parametrize("variant", ["current", "legacy"])
def test_windows_sshd_config_is_valid_and_restricts_the_account(rendered: Path, tmp_path: Path,
                                                                  variant: str) -> None:
    """The whole Win32-OpenSSH sshd_config, checked by OpenSSH's own parser (the same keywords)."""
    text = (rendered / f"windows-{variant}.conf").read_text()
    settings = effective(text, tmp_path)
    assert settings["permitopen"] == PERMIT_OPEN
    assert settings["allowtcpforwarding"] == "local"
    assert settings["permittty"] == "no"
    assert settings["forcecommand"] == "cmd.exe /c exit 1"
    assert settings["authorizedkeysfile"] == "__PROGRAMDATA__/ssh/tunnel_authorized_keys"
    assert settings["passwordauthentication"] == "no"
    assert settings["subsystem"] == "sftp sftp-server.exe"
    assert "Match Group administrators" in text and "administrators_authorized_keys" in text
    assert not re.search(r"(?mi)^\s*Include\s", text)
    assert ("PermitListen" in text) == (variant == "current")  # 7.7 (Server 2019) knows neither keyword
    assert ("PermitUserRC" in text) == (variant == "current")
    admin = effective(text, tmp_path, user="root")
    assert admin["allowtcpforwarding"] == "yes" and admin["forcecommand"] == "none"


def test_nftables_table_is_accepted_by_nft(rendered: Path) -> None:
    require(["nft"])
    text = (rendered / "tunnel-ssh.nft").read_text()
    assert "tcp dport 22 ct state new accept" in text and "policy drop" in text
    assert "198.51.100.0/24" in text and "2001:db8::/32" in text
    checked = run(["nft", "-c", "-f", str(rendered / "tunnel-ssh.nft")])
    assert checked.returncode == 0, checked.stderr


# --- live: the Linux twin applied to a namespace host ----------------------------------------------------
class TunnelHost(RemoteHost):
    """A RemoteHost whose sshd also reads ~/.ssh/authorized_keys and Includes a test-owned sshd_config.d."""

    def __init__(self, workdir: Path, fragment_dir: Path) -> None:
        super().__init__(workdir)
        self.fragment_dir = fragment_dir
        self.sshd_extra = ["Subsystem sftp internal-sftp", f"Include {fragment_dir}/*.conf"]

    def sshd_config_text(self) -> str:
        text = super().sshd_config_text()
        return text.replace(f"AuthorizedKeysFile {self.authorized_keys}",
                            f"AuthorizedKeysFile {self.authorized_keys} .ssh/authorized_keys")


def run_playbook(inventory: Path, home: Path, log: Path) -> dict:
    """site.yml against the inventory with the json callback; returns its report."""
    env = ansible_env(home)
    env["ANSIBLE_STDOUT_CALLBACK"] = "json"
    result = run(["ansible-playbook", "-i", str(inventory), str(ANSIBLE / "site.yml")], timeout=240,
                 cwd=ANSIBLE, env=env)
    log.write_text(result.stdout + "\n--- stderr\n" + result.stderr)
    assert "[WARNING]" not in result.stderr, result.stderr[-3000:]
    try:
        report = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        raise AssertionError(f"ansible-playbook rc={result.returncode}: {result.stderr[-3000:]}") from None
    failed = [(task["task"]["name"], res.get("msg"), res.get("stderr"))
              for play in report["plays"] for task in play["tasks"]
              for res in task["hosts"].values() if res.get("failed")]
    assert result.returncode == 0 and not failed, f"rc={result.returncode} failed={failed} {result.stderr[-2000:]}"
    return report


def default_file_settings(path: Path) -> dict[str, object]:
    """An /etc/default file's variables as the shell reads them, ARGS as a normalised flag set."""
    script = f'set -a; . "{path}"; python3 -c "import json, os; print(json.dumps(dict(os.environ)))"'
    env = json.loads(run(["env", "-i", "PATH=/usr/bin:/bin", "sh", "-c", script]).stdout)
    settings: dict[str, object] = {k: v for k, v in env.items() if k not in ("PATH", "PWD", "SHLVL", "_")}
    words, flags = str(settings.pop("ARGS", "")).split(), set()
    while words:
        word = words.pop(0).lstrip("-")
        if "=" not in word and words and not words[0].startswith("-"):
            word += "=" + words.pop(0)
        flags.add(word)
    settings["ARGS"] = sorted(flags)
    return settings


def changed_tasks(report: dict) -> list[str]:
    """Names (without the "role : " prefix) of the tasks that reported a change."""
    return [task["task"]["name"].split(" : ", 1)[-1] for play in report["plays"] for task in play["tasks"]
            for res in task["hosts"].values() if res.get("changed")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def shared_tunnel_account() -> Iterator[tuple[str, str]]:
    """The real account name `tunnel` and the comment marking it as this run's, held under the lock that
    tests/pipeline_host.py uses for the same account (the namespace shares /etc/passwd with this machine, so
    concurrent runs take turns). A `tunnel` left by a dead run (its mark names a gone pid) is removed first;
    one that is not a test's is never touched. The caller deletes the account before the lock is released."""
    ACCOUNT_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(ACCOUNT_LOCK, "w") as lock:
        wait_until(lambda: _try_lock(lock), 300, f"{ACCOUNT_LOCK} (another test run uses the account)", 0.2)
        try:
            existing = pwd.getpwnam(TUNNEL_USER)
        except KeyError:
            existing = None
        if existing is not None:
            pid = existing.pw_gecos.removeprefix(ACCOUNT_MARK)
            if not (existing.pw_gecos.startswith(ACCOUNT_MARK) and pid.isdigit() and not Path(f"/proc/{pid}").exists()):
                pytest.fail(f"a user {TUNNEL_USER!r} exists and is not a stale test account: not touching it")
            delete_user(TUNNEL_USER)
        yield TUNNEL_USER, f"{ACCOUNT_MARK}{os.getpid()}"


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.netns
def test_linux_twin_applied_twice_then_the_agent_tunnels_as_the_restricted_account(tmp_path: Path) -> None:
    require([*TOOLS, "ip", "iptables", "nft", "start-stop-daemon", "redis-server", "redis-cli", "ssh",
             "/usr/bin/prometheus-redis-exporter", "/usr/bin/prometheus-postgres-exporter", "userdel"])
    with shared_tunnel_account() as (account, comment):
        apply_twice_then_tunnel(tmp_path, account, comment)


def apply_twice_then_tunnel(tmp_path: Path, account: str, comment: str) -> None:
    """site.yml twice against a namespace host, then the agent through the account it created."""
    # Outside tmp_path because the account must traverse to its home (tmp_path is 0700 root).
    base = Path(tempfile.mkdtemp(prefix="ansible-live-"))
    base.chmod(0o755)
    fragment_dir = base / "sshd_config.d"
    fragment_dir.mkdir()
    host = TunnelHost(tmp_path / "host", fragment_dir)
    run_dir = base / "run"
    agents: list[AgentProcess] = []
    try:
        host.start_sshd()
        host.spawn(["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no",
                    "--dir", str(tmp_path)])
        wait_until(lambda: host.exec(["redis-cli", "-h", "127.0.0.1", "ping"], check=False).stdout.strip() == "PONG",
                   10, "redis-server in the namespace")
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(host.known_hosts_line())
        agent_key = keygen(tmp_path / "agent_key", comment="agent")
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"children": {"monitored": {"hosts": {"nshost": {
            "ansible_host": host.addr,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(host.client_key),
            "ansible_ssh_common_args": f"-F /dev/null -o UserKnownHostsFile={known_hosts} "
                                       "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
            # The namespace shares this machine's packages: the test never installs any (they are present).
            "openssh_server_install_packages": False,
            "ssh_firewall_install_packages": False,
            "exporters_install_packages": False,
            "openssh_server_config_file": str(host.workdir / "sshd_config"),
            "openssh_server_service_manager": "pidfile",
            "openssh_server_pidfile": str(host.workdir / "sshd.pid"),
            "ssh_firewall_linux_backend": "nftables",
            "ssh_firewall_nftables_file": str(base / "nftables.d" / "tunnel-ssh.nft"),
            "ssh_firewall_remote_ips": [host.gateway],
            "tunnel_account_name": account,
            "tunnel_account_comment": comment,
            "tunnel_account_home": str(base / "home" / account),
            "tunnel_account_authorized_keys": [Path(f"{agent_key}.pub").read_text().strip()],
            "tunnel_account_sshd_fragment": str(fragment_dir / "tunnel-account.conf"),
            "tunnel_account_sshd_validate_host_key": str(host.host_key),
            "exporters_service_manager": "start-stop-daemon",
            "exporters_defaults_dir": str(base / "default"),
            "exporters_run_dir": str(run_dir),
            "exporters_log_dir": str(base / "log"),
        }}}}}}))
        (base / "default").mkdir()
        home = base / "ansible-home"

        first = run_playbook(inventory, home, tmp_path / "first-run.json")
        changed = changed_tasks(first)
        for task in ("Create the tunnel account (no password login, no shell)", "Write the account's authorized_keys",
                     "Write the restricted account's sshd_config fragment (validated with sshd -t on the staged copy)",
                     "Write the exporters' /etc/default files (listen on 127.0.0.1)",
                     "Write the SSH-only table (validated with nft -c before it replaces the live file)"):
            assert task in changed, f"first run did not change {task!r}: {changed}"
        assert first["stats"]["nshost"]["changed"] > 0

        second = run_playbook(inventory, home, tmp_path / "second-run.json")
        assert second["stats"]["nshost"]["changed"] == 0, f"second run changed {changed_tasks(second)}"
        assert second["stats"]["nshost"]["failures"] == 0

        # What the playbook left on the host.
        entry = pwd.getpwnam(account)
        assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_dir == str(base / "home" / account)
        for name in ("prometheus-redis-exporter", "prometheus-postgres-exporter"):
            ours = default_file_settings(base / "default" / name)
            theirs = default_file_settings(ROOT / "server-side" / "linux" / "default" / name)
            assert ours == theirs, f"{name}: the role writes {ours}, server-side/linux/default has {theirs}"
        pids = {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}
        assert set(pids) == {"prometheus-redis-exporter", "prometheus-postgres-exporter"}, pids
        assert all(_pid_alive(pid) for pid in pids.values()), pids
        netns = os.readlink(f"/proc/{host.sshd.pid}/ns/net") if host.sshd else None
        assert {os.readlink(f"/proc/{pid}/ns/net") for pid in pids.values()} == {netns}
        table = host.exec(["nft", "list", "table", "inet", "tunnel_ssh"]).stdout
        assert "ip saddr @ssh_v4 tcp dport 22 ct state new accept" in table and host.gateway in table
        wait_until(host._sshd_answers, 10, "sshd after its restart")
        # The nftables table: SSH from the operator's address passes (above and below), anything else is dropped.
        host.spawn([sys.executable, "-m", "http.server", "--bind", host.addr, "9999"])
        wait_until(lambda: "9999" in host.exec(["ss", "-ltnH"]).stdout, 10, "a test listener on port 9999")
        with pytest.raises(TimeoutError):
            socket.create_connection((host.addr, 9999), timeout=1).close()

        # The real agent, as the restricted account, to the exporters the playbook started.
        redis_port, postgres_port = free_port(), free_port()
        agent = AgentProcess([
            "-q", "-F", "none", "-i", str(agent_key), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "IdentitiesOnly=yes", "-L", f"{redis_port}:127.0.0.1:9121",
            "-L", f"{postgres_port}:127.0.0.1:9187", f"{account}@{host.addr}"], tmp_path)
        agents.append(agent)
        agent.wait_up(20)
        redis = parse_metrics(wait_fetch(f"http://127.0.0.1:{redis_port}/metrics", 20).decode())
        assert redis.get("redis_up") == 1.0, "redis_exporter does not see the namespace's redis"
        assert any(k.startswith("redis_exporter_build_info") for k in redis)
        postgres = parse_metrics(wait_fetch(f"http://127.0.0.1:{postgres_port}/metrics", 20).decode())
        assert "pg_up" in postgres

        assert_account_is_restricted(host, account, agent_key, known_hosts)
    finally:
        cleanup(agents, run_dir, base, host, account)


def cleanup(agents: list[AgentProcess], run_dir: Path, base: Path, host: RemoteHost, account: str) -> None:
    """Stop what the test and the playbook started (by PID), delete the account and every file, whatever failed."""
    steps = [lambda: [agent.stop() for agent in agents], lambda: stop_pidfiles(run_dir),
             lambda: close_control_masters(base / "ansible-home" / "cp"), host.close,
             lambda: delete_user(account), lambda: shutil.rmtree(base, ignore_errors=True)]
    errors = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - keep cleaning up; report at the end
            errors.append(repr(exc))
    assert not errors, f"cleanup failed: {errors}"


def stop_pidfiles(run_dir: Path) -> None:
    for pidfile in run_dir.glob("*.pid") if run_dir.exists() else []:
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            continue
        wait_until(_gone(pid), 10, f"exporter {pid} to stop")


def _gone(pid: int) -> Callable[[], bool]:
    return lambda: not _pid_alive(pid)


def close_control_masters(directory: Path) -> None:
    """Ansible's ssh ControlPersist masters (they would outlive the run by 60 s)."""
    for socket_path in directory.glob("*") if directory.exists() else []:
        run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "nshost"], timeout=10)


def delete_user(account: str) -> None:
    """userdel -r; its home is root-owned (by design), so userdel keeps it (status 12) and rmtree removes it."""
    try:
        pwd.getpwnam(account)
    except KeyError:
        return
    result = run(["userdel", "-r", account], timeout=30)
    assert result.returncode in (0, 12), result.stderr
    with pytest.raises(KeyError):
        pwd.getpwnam(account)


def assert_account_is_restricted(host: RemoteHost, account: str, key: Path, known_hosts: Path) -> None:
    """Forwards to the exporter ports only; no command, no PTY, no remote forward."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host.addr, username=account, key_filename=str(key), look_for_keys=False, allow_agent=False,
                   timeout=10)
    try:
        transport = client.get_transport()
        assert transport is not None
        transport.open_channel("direct-tcpip", ("127.0.0.1", 9121), ("127.0.0.1", 0), timeout=10).close()
        for port in (6379, 22):
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=10)
        with pytest.raises(paramiko.ChannelException):  # PermitOpen compares the host string literally
            transport.open_channel("direct-tcpip", ("localhost", 9121), ("127.0.0.1", 0), timeout=10)
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward("127.0.0.1", 0)
    finally:
        client.close()

    ssh = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
           f"{account}@{host.addr}"]
    command = run([*ssh, "id; echo ran-a-command"], timeout=20)
    assert command.returncode != 0 and "ran-a-command" not in command.stdout and "uid=" not in command.stdout, \
        command
    pty = run([*ssh[:-1], "-tt", ssh[-1]], timeout=20, input="id; echo ran-a-shell\nexit\n")
    assert pty.returncode != 0 and "ran-a-shell" not in pty.stdout, pty
    remote = run([*ssh[:-1], "-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:22", ssh[-1]],
                 timeout=20)
    assert remote.returncode != 0 and "remote port forwarding failed" in remote.stderr, remote
