"""Results table in PostgreSQL (psycopg2): one row per finished or failed transcription."""
from __future__ import annotations

import psycopg2
import psycopg2.errors

SCHEMA = """
CREATE TABLE IF NOT EXISTS transcriptions (
    task_id    text PRIMARY KEY,
    worker     text NOT NULL,
    status     text NOT NULL,
    seconds    double precision NOT NULL,
    text       text,
    finished_at timestamptz NOT NULL DEFAULT now()
)
"""


def connect(database_url: str) -> "psycopg2.extensions.connection":
    return psycopg2.connect(database_url, connect_timeout=5)


def ensure_schema(database_url: str) -> None:
    """Create the results table if it is missing (safe to run from several processes at once)."""
    conn = connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
    except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable):
        pass  # another process created it in the same instant
    finally:
        conn.close()


def record(database_url: str, task_id: str, worker: str, status: str, seconds: float, text: str | None) -> None:
    """Insert (or overwrite, on a retry) the result of one task."""
    conn = connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO transcriptions (task_id, worker, status, seconds, text) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (task_id) DO UPDATE SET worker = EXCLUDED.worker, status = EXCLUDED.status,"
                " seconds = EXCLUDED.seconds, text = EXCLUDED.text, finished_at = now()",
                (task_id, worker, status, seconds, text))
    finally:
        conn.close()


def fetch(database_url: str, task_id: str) -> dict[str, object] | None:
    """The stored result of a task, or None."""
    conn = connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT task_id, worker, status, seconds, text FROM transcriptions WHERE task_id = %s",
                        (task_id,))
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    return dict(zip(("task_id", "worker", "status", "seconds", "text"), row))
