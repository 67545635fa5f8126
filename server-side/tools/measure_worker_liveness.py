"""Measure how long each liveness signal takes to notice a kill -9'd Celery worker (run as root).

    sudo .venv/bin/python server-side/tools/measure_worker_liveness.py [--cap 240]

Starts the reference pipeline in a throwaway network namespace (tests/pipeline_host.py) with two Flowers
(default options on :5555, --purge_offline_workers=10 on :5556), kills one of two workers with SIGKILL
and polls, every 0.5 s, until every signal flipped or --cap seconds passed:
  - Flower's /api/workers?status=true alive flag (what the agent's celery_worker_up reads),
  - Flower's flower_worker_online gauge (what the seed's NoWorkersOnline alert reads),
  - whether the --purge_offline_workers Flower still exports the dead worker's flower_worker_online.
Prints one JSON object with the seconds after the kill (null: not flipped within the cap).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from pipeline_host import PipelineHost  # noqa: E402
from remote_host import RemoteHost  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=240.0, help="stop polling after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="measure-liveness-") as workdir, RemoteHost(Path(workdir)) as host:
        host.start_sshd()
        with PipelineHost(host, workers=2) as pipe:
            env = {**pipe.env, "FLOWER_BASIC_AUTH": ":".join(pipe.flower_auth)}
            pipe._spawn("flower_purge", [sys.executable, "-m", "celery", "-A", "pipeline.tasks", "flower",
                                         "--address=127.0.0.1", "--port=5556", "--purge_offline_workers=10"], env)
            victim = pipe.worker_names[0]
            series = f'flower_worker_online{{worker="{victim}"}}'
            deadline = time.monotonic() + 20
            while series not in pipe.metrics(5556) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pipe.metrics(5555).get(series) == 1 and pipe.metrics(5556).get(series) == 1
            flipped: dict[str, float | None] = {"api_workers_alive_false": None, "flower_worker_online_0": None,
                                                "purged_series_gone": None}
            killed = time.monotonic()
            pipe.kill_worker(victim)
            while time.monotonic() - killed < args.cap and None in flipped.values():
                now = round(time.monotonic() - killed, 1)
                if flipped["api_workers_alive_false"] is None and pipe.workers_alive().get(victim) is False:
                    flipped["api_workers_alive_false"] = now
                if flipped["flower_worker_online_0"] is None and pipe.metrics(5555).get(series) == 0:
                    flipped["flower_worker_online_0"] = now
                if flipped["purged_series_gone"] is None and series not in pipe.metrics(5556):
                    flipped["purged_series_gone"] = now
                time.sleep(0.5)
            still = pipe.metrics(5555).get(series)
            print(json.dumps({"cap_seconds": args.cap, "seconds_after_kill": flipped,
                              "flower_worker_online_at_end": still,
                              "observed_for": round(time.monotonic() - killed, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
