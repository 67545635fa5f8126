"""Settings of the reference pipeline, read once from the environment (all have safe local defaults)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    broker_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://pipeline@127.0.0.1:5432/pipeline"
    task_seconds: float = 1.0        # how long one "transcription" takes
    task_failure_rate: float = 0.0   # fraction of tasks that raise
    api_addr: str = "127.0.0.1:8000"
    api_error_rate: float = 0.0      # fraction of API requests answered 500 (fault injection)
    admin: bool = False              # POST /admin/error-rate enabled (tests and demos only)


def _fraction(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a number between 0 and 1") from None
    if not 0.0 <= number <= 1.0:
        raise SystemExit(f"{name}={value!r}: expected a number between 0 and 1")
    return number


def load(environ: dict[str, str] | None = None) -> Settings:
    """Settings from PIPELINE_* variables; exits with a one-line message on a bad value."""
    env = dict(os.environ if environ is None else environ)
    base = Settings()
    seconds = env.get("PIPELINE_TASK_SECONDS", str(base.task_seconds))
    try:
        task_seconds = float(seconds)
    except ValueError:
        raise SystemExit(f"PIPELINE_TASK_SECONDS={seconds!r}: expected a number of seconds") from None
    return Settings(
        broker_url=env.get("PIPELINE_BROKER_URL", base.broker_url),
        database_url=env.get("PIPELINE_DATABASE_URL", base.database_url),
        task_seconds=task_seconds,
        task_failure_rate=_fraction("PIPELINE_TASK_FAILURE_RATE",
                                    env.get("PIPELINE_TASK_FAILURE_RATE", str(base.task_failure_rate))),
        api_addr=env.get("PIPELINE_API_ADDR", base.api_addr),
        api_error_rate=_fraction("PIPELINE_API_ERROR_RATE",
                                 env.get("PIPELINE_API_ERROR_RATE", str(base.api_error_rate))),
        admin=env.get("PIPELINE_ADMIN", "0") in ("1", "true", "yes"),
    )
