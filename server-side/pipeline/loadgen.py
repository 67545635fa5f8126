"""Load generator: a steady rate of API requests (mostly POST /transcribe, some GET /jobs/{id} and /health)."""
from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def _request(url: str, data: bytes | None, timeout: float) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            if data is not None:
                _recent.append(json.loads(body).get("task_id", ""))
                del _recent[:-100]
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


_recent: list[str] = []


def run(base_url: str, rate: float, duration: float, audio_seconds: float | None = None,
        stop: threading.Event | None = None, timeout: float = 5.0) -> Counter[int]:
    """Send `rate` requests per second for `duration` seconds (0: until `stop`); count answers by status."""
    stop = stop or threading.Event()
    counts: Counter[int] = Counter()
    lock = threading.Lock()
    interval = 1.0 / rate if rate > 0 else 1.0
    payload = json.dumps({"audio_seconds": audio_seconds} if audio_seconds is not None else {}).encode()

    def one() -> None:
        pick = random.random()
        if pick < 0.7:
            status = _request(f"{base_url}/transcribe", payload, timeout)
        elif pick < 0.9 and _recent:
            status = _request(f"{base_url}/jobs/{random.choice(_recent)}", None, timeout)
        else:
            status = _request(f"{base_url}/health", None, timeout)
        with lock:
            counts[status] += 1

    start = time.monotonic()
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        while not stop.is_set() and (duration <= 0 or time.monotonic() - start < duration):
            pool.submit(one)
            sent += 1
            stop.wait(max(0.0, start + sent * interval - time.monotonic()))
    return counts
