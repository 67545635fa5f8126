"""Reconnect delays: at once, then exponential with jitter, capped (like autossh's, minus its gaps)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before the next attempt after `failures` consecutive failures.

    The first retry is immediate; then base * 2^(n-1), with +-20 % jitter so that many agents do not
    reconnect in lockstep, capped at `cap`. Failures that retrying cannot fix quickly (auth, host key)
    start from `slow_base`, which keeps them at no more than six attempts a minute. A refused TCP
    connection (sshd restarting: the host answers with a RST, which costs it nothing) is retried at
    least every `refused_cap` seconds, so forwards work again within that long of sshd accepting.
    """

    base: float = 0.25
    slow_base: float = 5.0
    cap: float = 30.0
    refused_cap: float = 1.0
    jitter: float = 0.2
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self, slow: bool = False, refused: bool = False) -> float:
        self.failures += 1
        if self.failures == 1 and not slow:
            return 0.0
        base = self.slow_base if slow else self.base
        raw = min(self.cap, base * 2 ** (self.failures - (1 if slow else 2)))
        delay = min(self.cap, raw * self.rng.uniform(1 - self.jitter, 1 + self.jitter))
        return min(delay, self.refused_cap) if refused and not slow else delay

    def reset(self) -> None:
        self.failures = 0
