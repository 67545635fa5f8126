"""The Celery app and its one task, `transcribe`: sleep, maybe fail, write the result to PostgreSQL."""
from __future__ import annotations

import random
import time

from celery import Celery, Task
from celery.signals import worker_init

from . import db, settings

SETTINGS = settings.load()

app = Celery("pipeline", broker=SETTINGS.broker_url)
app.conf.update(
    task_default_queue="celery",          # the queue depth is LLEN celery (redis_key_size{key="celery"})
    worker_send_task_events=True,         # Flower's task counters (flower_events_total)
    task_send_sent_event=True,
    task_acks_late=True,                  # a kill -9'd worker's task goes back to the queue
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_backend=None,
)


class TranscriptionFailed(RuntimeError):
    """The simulated model gave up on this audio."""


@worker_init.connect
def _schema(**_: object) -> None:
    try:
        db.ensure_schema(SETTINGS.database_url)
    except Exception:  # noqa: BLE001 - PostgreSQL may be down; each task reports it then
        pass


@app.task(name="transcribe", bind=True)
def transcribe(self: Task, audio_seconds: float | None = None, failure_rate: float | None = None) -> str:
    """Pretend to transcribe `audio_seconds` of audio (default PIPELINE_TASK_SECONDS)."""
    seconds = SETTINGS.task_seconds if audio_seconds is None else float(audio_seconds)
    rate = SETTINGS.task_failure_rate if failure_rate is None else float(failure_rate)
    time.sleep(max(0.0, seconds))
    worker = self.request.hostname or "unknown"
    if random.random() < rate:
        db.record(SETTINGS.database_url, self.request.id, worker, "failed", seconds, None)
        raise TranscriptionFailed(f"simulated failure after {seconds:g}s")
    text = f"transcript of {seconds:g}s of audio"
    db.record(SETTINGS.database_url, self.request.id, worker, "succeeded", seconds, text)
    return text


def enqueue(count: int, audio_seconds: float | None = None, failure_rate: float | None = None) -> list[str]:
    """Put `count` transcribe tasks on the queue; return their ids."""
    ids = []
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            result = transcribe.apply_async(kwargs={"audio_seconds": audio_seconds, "failure_rate": failure_rate},
                                            producer=producer)
            ids.append(result.id)
    return ids


def wait_for_broker(timeout: float = 10.0) -> None:
    """Block until the broker accepts a connection (raises after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
