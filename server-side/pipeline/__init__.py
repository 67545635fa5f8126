"""The reference pipeline: a STAND-IN for the production Whisper transcription pipeline.

A small but real workload with the same moving parts and the same metrics as the seed's system: an HTTP
API instrumented with prometheus-client (`api`), a Celery app with a Redis broker whose "transcribe" task
sleeps for a configurable time, fails at a configurable rate and writes its result to PostgreSQL
(`tasks`, `db`), and a load generator (`loadgen`). Settings come from the environment (`settings`).

Run it from the `server-side/` directory (or with it on PYTHONPATH):

    python -m pipeline api                      # HTTP API + /metrics on 127.0.0.1:8000
    celery -A pipeline.tasks worker -n celery@w1 --pool solo
    celery -A pipeline.tasks flower --address=127.0.0.1 --port=5555   # FLOWER_BASIC_AUTH=user:pass
    python -m pipeline enqueue 200              # put 200 tasks on the queue directly
    python -m pipeline loadgen --rate 5 --duration 60
"""
