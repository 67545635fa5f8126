"""The reference pipeline, live, inside a test's namespace "remote host" (a helper, not a test file).

Given a started `remote_host.RemoteHost`, `PipelineHost` starts on the namespace's own 127.0.0.1 exactly
what runs on a production Linux host (server-side/README.md, non-Docker path):

    redis-server            127.0.0.1:6379   broker; queue `celery` (LLEN = queue depth)
    postgres (initdb'd)     127.0.0.1:5432   results; run as user `postgres`, data and socket in a tmp dir
    API (python -m pipeline api)  :8000      /metrics with http_requests_total, ... ; /admin/error-rate
    Celery workers          (no port)        celery@w1 ... celery@wN, one process each (--pool solo)
    Flower                  127.0.0.1:5555   basic auth (generated password), /metrics, /api/workers
    redis_exporter          127.0.0.1:9121   Debian's prometheus-redis-exporter, -check-single-keys db0=celery
    postgres_exporter       127.0.0.1:9187   Debian's prometheus-postgres-exporter

Public API (stable; other helpers build on it):

    PipelineHost(host, workers=2, *, task_seconds=0.2, task_failure_rate=0.0, api_error_rate=0.0,
                 flower_options=())                      # e.g. ("--purge_offline_workers=60",)
    with PipelineHost(host, workers=2) as pipe:          # start() is called by __enter__ (or call it)
        pipe.flower_auth                                 # (user, password) for Flower / the agent config
        pipe.worker_names                                # names of the workers started now, e.g. celery@w1
        pipe.kill_worker("celery@w1")                    # SIGKILL (a crash: no worker-offline event)
        pipe.stop_worker("celery@w2")                    # SIGTERM, graceful (sends worker-offline)
        pipe.start_worker()                              # a new worker (next free name), returns its name
        pipe.kill_all_workers() / pipe.stop_all_workers()
        pipe.stop_service("redis") / pipe.start_service("redis")   # also postgres, redis_exporter,
                                                         # postgres_exporter, flower, api; start waits
                                                         # until it answers
        pipe.stop_redis() / start_redis(), stop_postgres() / start_postgres(),
        pipe.stop_redis_exporter() / start_redis_exporter()     # shorthands of the above
        pipe.enqueue(200, audio_seconds=0.1)             # tasks straight onto the broker
        pipe.queue_length()                              # LLEN celery
        pipe.set_error_rate(0.5)                         # fraction of API requests answered 500
        pipe.start_load(rate=5) / pipe.stop_load()       # the load generator against the API
        pipe.get(port, path, auth=None) -> (status, body)   # HTTP GET on the namespace's 127.0.0.1
        pipe.post(port, path, body, auth=None) -> (status, body)
        pipe.metrics(port, auth=None) -> {sample: value} # a /metrics page, parsed
        pipe.pids() -> {name: pid}                       # every process it runs (for RSS/CPU figures)
        pipe.workers_alive() -> {worker: bool}           # Flower's /api/workers?status=true
    # close() (by __exit__) stops everything it started, by PID, and removes its files. Close it before
    # the RemoteHost (processes outlive a deleted namespace).

    with tunnel_account(host):                           # the real restricted account `tunnel`
        host.start_sshd()                                # sshd_config now ends with the Match block
        ...                                              # connect as tunnel@host.addr with host.client_key
    # The user is created (useradd, home in the host's workdir) and removed (userdel -r) around the block;
    # a lock file serialises tests of concurrent runs that need the same account (so one block at a time per
    # process: a nested second one waits for its timeout). The host's workdir must
    # be readable by the account (sshd reads authorized_keys as the user): use traversable_workdir().

Calls from the test process into the namespace (HTTP, Redis) run on threads that entered the namespace
with setns(2), so they cost no process start. Start-up runs everything at once and polls all readiness
conditions together (about 5 s on 2 cores).
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import importlib.util
import pwd
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from agent_process import parse_metrics
from remote_host import RemoteHost, wait_until

ROOT = Path(__file__).resolve().parent.parent
SERVER_SIDE = ROOT / "server-side"
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/lib/postgresql/15/bin"))
REDIS_SERVER = "redis-server"
REDIS_EXPORTER = "prometheus-redis-exporter"
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
BINARIES = (REDIS_SERVER, REDIS_EXPORTER, POSTGRES_EXPORTER, str(PG_BIN / "postgres"), str(PG_BIN / "initdb"),
            "setpriv")

API_PORT, FLOWER_PORT, POSTGRES_EXPORTER_PORT, REDIS_EXPORTER_PORT = 8000, 5555, 9187, 9121
REDIS_PORT, POSTGRES_PORT = 6379, 5432
SERVICES = ("redis", "postgres", "api", "flower", "redis_exporter", "postgres_exporter")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

TUNNEL_USER = "tunnel"
TUNNEL_FRAGMENT = SERVER_SIDE / "sshd" / "tunnel-account.conf"
_ACCOUNT_LOCK = Path("/run/lock/ssh-tunnel-agent-tests-tunnel-user.lock")
_ACCOUNT_MARK = "ssh-tunnel-agent test account, pid "


def traversable_workdir(prefix: str = "remote-host-") -> Path:
    """A fresh directory under /tmp that other users may traverse (0711): pass it as RemoteHost(workdir=...)
    when a non-root account must log in (sshd reads authorized_keys as that user). Remove it yourself."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o711)
    return path


def _user_exists(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


@contextmanager
def tunnel_account(host: RemoteHost, timeout: float = 300.0) -> Iterator[str]:
    """The real account `tunnel` (login shell /bin/sh, home in the host's workdir) for the duration of the
    block, with server-side/sshd/tunnel-account.conf appended to the host's sshd_config (sshd_extra).

    Start (or restart) sshd inside the block. A user `tunnel` that this helper did not create is never
    touched (the test fails instead); a stale one from a killed test run (its pid is gone) is removed first.
    """
    _ACCOUNT_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(_ACCOUNT_LOCK, "w")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{_ACCOUNT_LOCK} held for {timeout:.0f}s by another test (of this or "
                                       "another run): one tunnel_account at a time") from None
                time.sleep(0.2)
        existing = _user_exists(TUNNEL_USER)
        if existing is not None:
            pid = existing.pw_gecos.removeprefix(_ACCOUNT_MARK)
            if existing.pw_gecos.startswith(_ACCOUNT_MARK) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                subprocess.run(["userdel", "-r", TUNNEL_USER], capture_output=True)
            else:
                raise RuntimeError(f"a user {TUNNEL_USER!r} already exists on this machine and is not ours: "
                                   "not touching it")
        home = host.workdir / "home-tunnel"
        # -p '*': no password but not locked ('!' makes sshd with UsePAM no refuse even keys)
        subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/sh", "-p", "*",
                        "-c", f"{_ACCOUNT_MARK}{os.getpid()}", TUNNEL_USER], check=True, capture_output=True)
        try:
            host.sshd_extra = [*host.sshd_extra, *TUNNEL_FRAGMENT.read_text().splitlines()]
            yield TUNNEL_USER
        finally:
            host.kill_sessions()  # no process of the account may outlive it
            if subprocess.run(["userdel", "-r", TUNNEL_USER], capture_output=True).returncode not in (0, 12):
                subprocess.run(["userdel", "-r", "-f", TUNNEL_USER], capture_output=True)
    finally:
        lock.close()


def _enter_netns(ns: str) -> None:
    """Move the calling thread into network namespace `ns` (sockets it creates live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns})")
    finally:
        os.close(fd)


class PipelineHost:
    """Redis, PostgreSQL, the API, Celery workers, Flower and both exporters on a RemoteHost's 127.0.0.1."""

    def __init__(self, host: RemoteHost, workers: int = 2, *, task_seconds: float = 0.2,
                 task_failure_rate: float = 0.0, api_error_rate: float = 0.0,
                 flower_options: tuple[str, ...] = ()) -> None:
        self.host = host
        self.initial_workers = workers
        self.flower_options = flower_options
        # postgres must be able to reach its data dir: a fresh dir under /tmp, not pytest's 0700 tree
        self.workdir = Path(tempfile.mkdtemp(prefix="pipeline-host-"))
        self.logs = self.workdir / "logs"
        self.logs.mkdir()
        self.flower_auth = ("monitor", secrets.token_urlsafe(18))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "FLOWER_"))},
            "PYTHONPATH": str(SERVER_SIDE),
            "PYTHONUNBUFFERED": "1",
            "PIPELINE_BROKER_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
            "PIPELINE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{POSTGRES_PORT}/pipeline",
            "PIPELINE_TASK_SECONDS": str(task_seconds),
            "PIPELINE_TASK_FAILURE_RATE": str(task_failure_rate),
            "PIPELINE_API_ADDR": f"127.0.0.1:{API_PORT}",
            "PIPELINE_API_ERROR_RATE": str(api_error_rate),
            "PIPELINE_ADMIN": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self._worker_seq = 0
        self._pgdata = self.workdir / "pg"
        self._ns_pool = ThreadPoolExecutor(4, thread_name_prefix=f"ns-{host.ns}", initializer=_enter_netns,
                                           initargs=(host.ns,))
        self._started = False

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 40.0) -> "PipelineHost":
        """Start every service and worker at once; return when all of them answer."""
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        initdb = self._initdb_begin()
        self.start_service("redis", wait=False)
        self.start_service("redis_exporter", wait=False)
        self.start_service("flower", wait=False)
        for _ in range(self.initial_workers):
            self.start_worker(wait=False)
        self._initdb_end(initdb)
        self.start_service("postgres", wait=False)
        self.start_service("postgres_exporter", wait=False)
        self.start_service("api", wait=False)
        self._wait(lambda: self._ready("postgres"), deadline, "postgres")
        self._in_ns(self._create_database)
        checks: dict[str, Callable[[], bool]] = {name: functools.partial(self._ready, name) for name in SERVICES}
        checks["workers"] = lambda: self._all_alive(self.worker_names)
        pending = dict(checks)

        def all_ready() -> bool:
            for name, check in list(pending.items()):
                if check():
                    del pending[name]
            return not pending

        self._wait(all_ready, deadline, "pipeline services", pending)
        self._started = True

    def _wait(self, check: Callable[[], object], deadline: float, what: str, pending: dict | None = None) -> None:
        def probe() -> object:
            self._check_alive()
            return check()
        try:
            wait_until(probe, max(0.1, deadline - time.monotonic()), what, interval=0.1)
        except TimeoutError as exc:
            names = ", ".join(pending) if pending else what
            raise TimeoutError(f"{exc} (not ready: {names}); logs in {self.logs}:\n{self.log_tail()}") from None

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str | None = None, chars: int = 1500) -> str:
        """The end of one service's log (or of every log)."""
        paths = [self.logs / f"{name}.log"] if name else sorted(self.logs.glob("*.log"))
        parts = []
        for path in paths:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop everything this helper started (by PID) and remove its files."""
        self.stop_load()
        workers = [n for n in self.procs if n.startswith("celery@")]
        for name in workers:  # clients first, all at once; the broker and database last
            self.procs[name].send_signal(signal.SIGTERM)
        for name in [*workers, "api", "flower", "redis_exporter", "postgres_exporter", *list(self.procs)]:
            self._stop(name, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        self._ns_pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PipelineHost":
        return self.start() if not self._started else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log = open(self.logs / f"{name}.log", "ab")
        try:
            # `ip netns exec` execs the command in place: the Popen's pid is the service's own pid
            proc = subprocess.Popen(["ip", "netns", "exec", self.host.ns, *cmd], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env or self.env, cwd=SERVER_SIDE)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def _stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def pids(self) -> dict[str, int]:
        """PID of every running process this helper started, by name."""
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def _service_cmd(self, name: str) -> tuple[list[str], dict[str, str] | None]:
        py = [sys.executable, "-m"]
        if name == "redis":
            return [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"], None
        if name == "postgres":
            return [*self._as_postgres(), str(PG_BIN / "postgres"), "-D", str(self._pgdata / "data"),
                    "-k", str(self._pgdata), "-h", "127.0.0.1", "-p", str(POSTGRES_PORT), "-c", "fsync=off",
                    "-c", "shared_buffers=16MB", "-c", "max_connections=40"], None
        if name == "api":
            return [*py, "pipeline", "api"], None
        if name == "flower":
            env = {**self.env, "FLOWER_BASIC_AUTH": ":".join(self.flower_auth)}
            return [*py, "celery", "-A", "pipeline.tasks", "flower", "--address=127.0.0.1",
                    f"--port={FLOWER_PORT}", *self.flower_options], env
        if name == "redis_exporter":
            return [REDIS_EXPORTER, "-redis.addr", f"redis://127.0.0.1:{REDIS_PORT}",
                    "-web.listen-address", f"127.0.0.1:{REDIS_EXPORTER_PORT}",
                    "-check-single-keys", "db0=celery"], None
        if name == "postgres_exporter":
            env = {**self.env,
                   "DATA_SOURCE_NAME": f"postgresql://postgres@127.0.0.1:{POSTGRES_PORT}/postgres?sslmode=disable"}
            return [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{POSTGRES_EXPORTER_PORT}"], env
        raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")

    def start_service(self, name: str, wait: bool = True, timeout: float = 20.0) -> None:
        """Start one service (redis, postgres, api, flower, redis_exporter, postgres_exporter)."""
        cmd, env = self._service_cmd(name)
        self._spawn(name, cmd, env)
        if wait:
            self._wait(lambda: self._ready(name), time.monotonic() + timeout, name)

    def stop_service(self, name: str) -> None:
        """Stop one service gracefully (postgres: fast shutdown) and wait for its exit."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")
        self._stop(name, signal.SIGINT if name == "postgres" else signal.SIGTERM)

    # shorthands for the services the alert tests take down and bring back
    def stop_redis(self) -> None:
        """Stop the broker (no persistence: queued tasks are lost, as with a crashed Redis)."""
        self.stop_service("redis")

    def start_redis(self) -> None:
        self.start_service("redis")

    def stop_postgres(self) -> None:
        self.stop_service("postgres")

    def start_postgres(self) -> None:
        self.start_service("postgres")

    def stop_redis_exporter(self) -> None:
        self.stop_service("redis_exporter")

    def start_redis_exporter(self) -> None:
        self.start_service("redis_exporter")

    def _ready(self, name: str) -> bool:
        if name == "redis":
            return self._in_ns(_redis_command, "PING") == "+PONG"
        if name == "postgres":  # accepting queries, not just the port open ("the database system is starting up")
            return self._in_ns(_postgres_answers)
        if name == "api":
            return self.get(API_PORT, "/metrics")[0] == 200
        if name == "flower":
            return self.get(FLOWER_PORT, "/healthcheck")[0] == 200
        if name == "redis_exporter":
            return self.metrics(REDIS_EXPORTER_PORT).get("redis_up") == 1.0
        if name == "postgres_exporter":
            return self.metrics(POSTGRES_EXPORTER_PORT).get("pg_up") == 1.0
        raise ValueError(name)

    # -- PostgreSQL ----------------------------------------------------------------------------------
    def _as_postgres(self) -> list[str]:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--reset-env"]

    def _initdb_begin(self) -> subprocess.Popen:
        self._pgdata.mkdir()
        shutil.chown(self._pgdata, "postgres", "postgres")
        os.chmod(self.workdir, 0o711)  # postgres may traverse to its own directory, nothing else
        return subprocess.Popen([*self._as_postgres(), str(PG_BIN / "initdb"), "-D", str(self._pgdata / "data"),
                                 "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/")

    def _initdb_end(self, proc: subprocess.Popen) -> None:
        out, _ = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.decode(errors='replace')[-1500:]}")

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=POSTGRES_PORT, user="postgres", dbname="postgres",
                                connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = 'pipeline'")
                if cur.fetchone() is None:
                    cur.execute("CREATE DATABASE pipeline")
        finally:
            conn.close()
        spec = importlib.util.spec_from_file_location("_pipeline_db", SERVER_SIDE / "pipeline" / "db.py")
        assert spec is not None and spec.loader is not None
        db = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(db)
        db.ensure_schema(self.env["PIPELINE_DATABASE_URL"])

    # -- workers -------------------------------------------------------------------------------------
    @property
    def worker_names(self) -> list[str]:
        """Names of the workers whose process is running now."""
        return [n for n, p in self.procs.items() if n.startswith("celery@") and p.poll() is None]

    def start_worker(self, name: str | None = None, wait: bool = True, timeout: float = 20.0) -> str:
        """Start a worker (default: the next unused name celery@wN); wait until Flower sees it alive."""
        if name is None:
            self._worker_seq += 1
            name = f"celery@w{self._worker_seq}"
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "pipeline.tasks", "worker", "--hostname", name,
                           "--pool", "solo", "--without-mingle", "--without-gossip", "-E", "--loglevel", "INFO"])
        if wait:
            self._wait(lambda: self._all_alive([name]), time.monotonic() + timeout, f"worker {name} online")
        return name

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker (a crash: it sends no worker-offline event)."""
        self._stop(name, signal.SIGKILL)

    def stop_worker(self, name: str) -> None:
        """SIGTERM a worker and wait: a graceful (warm) shutdown that sends worker-offline."""
        self._stop(name, signal.SIGTERM, timeout=20)

    def kill_all_workers(self) -> None:
        for name in self.worker_names:
            self.kill_worker(name)

    def stop_all_workers(self) -> None:
        for name in self.worker_names:
            self.procs[name].send_signal(signal.SIGTERM)
        for name in self.worker_names:
            self._stop(name, timeout=20)

    def workers_alive(self) -> dict[str, bool]:
        """Flower's view: worker -> alive (heartbeat-based), from /api/workers?status=true."""
        import json

        status, body = self.get(FLOWER_PORT, "/api/workers?status=true", auth=self.flower_auth)
        return json.loads(body) if status == 200 else {}

    def _all_alive(self, names: list[str]) -> bool:
        alive = self.workers_alive()
        return all(alive.get(n) for n in names)

    # -- work ----------------------------------------------------------------------------------------
    def enqueue(self, count: int, audio_seconds: float | None = None, failure_rate: float | None = None) -> None:
        """Put `count` transcribe tasks on the queue (python -m pipeline enqueue, inside the namespace)."""
        cmd = [sys.executable, "-m", "pipeline", "enqueue", str(count)]
        if audio_seconds is not None:
            cmd += ["--audio-seconds", str(audio_seconds)]
        if failure_rate is not None:
            cmd += ["--failure-rate", str(failure_rate)]
        result = subprocess.run(["ip", "netns", "exec", self.host.ns, *cmd], env=self.env, cwd=SERVER_SIDE,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or f"enqueued {count}" not in result.stdout:
            raise RuntimeError(f"enqueue failed: {result.stdout[-500:]} {result.stderr[-1500:]}")

    def queue_length(self, queue: str = "celery") -> int:
        """LLEN of the queue's Redis list (the real queue depth)."""
        reply = self._in_ns(_redis_command, "LLEN", queue)
        if not reply.startswith(":"):
            raise RuntimeError(f"LLEN {queue}: {reply}")
        return int(reply[1:])

    def set_error_rate(self, rate: float) -> None:
        """Make this fraction (0..1) of API requests answer 500 (POST /admin/error-rate)."""
        status, body = self._in_ns(_http, API_PORT, "/admin/error-rate", None, str(rate).encode())
        if status != 200:
            raise RuntimeError(f"setting the error rate failed: HTTP {status} {body!r}")

    def start_load(self, rate: float = 5.0, audio_seconds: float | None = None) -> None:
        """Run the load generator against the API until stop_load() (or close())."""
        cmd = [sys.executable, "-m", "pipeline", "loadgen", "--rate", str(rate), "--duration", "0"]
        if audio_seconds is not None:
            cmd += ["--audio-seconds", str(audio_seconds)]
        self._spawn("loadgen", cmd)

    def stop_load(self) -> None:
        self._stop("loadgen")

    # -- HTTP inside the namespace -------------------------------------------------------------------
    def get(self, port: int, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """GET http://127.0.0.1:<port><path> inside the namespace; (0, b"") if nothing answers."""
        return self._in_ns(_http, port, path, auth, None)

    def post(self, port: int, path: str, body: bytes, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """POST `body` to http://127.0.0.1:<port><path> inside the namespace; (0, b"") if nothing answers."""
        return self._in_ns(_http, port, path, auth, body)

    def metrics(self, port: int, auth: tuple[str, str] | None = None) -> dict[str, float]:
        status, body = self.get(port, "/metrics", auth)
        return parse_metrics(body.decode(errors="replace")) if status == 200 else {}

    def _in_ns(self, fn: Callable[..., T], *args: object) -> T:
        return self._ns_pool.submit(fn, *args).result()


def _http(port: int, path: str, auth: tuple[str, str] | None, data: bytes | None) -> tuple[int, bytes]:
    headers = {"Authorization": "Basic " + b64encode(":".join(auth).encode()).decode()} if auth else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def _postgres_answers() -> bool:
    import psycopg2

    try:
        conn = psycopg2.connect(host="127.0.0.1", port=POSTGRES_PORT, user="postgres", dbname="postgres",
                                connect_timeout=2)
    except psycopg2.OperationalError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    finally:
        conn.close()


def _redis_command(*args: str) -> str:
    """One RESP command to the namespace's Redis; the first reply line (e.g. '+PONG', ':200'), or ''."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=2) as sock:
            sock.sendall(payload.encode())
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace").split("\r\n", 1)[0]
    except OSError:
        return ""
