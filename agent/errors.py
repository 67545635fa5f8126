"""Errors that carry a one-line message for the operator (what is wrong, and how to fix it)."""
from __future__ import annotations


class AgentError(Exception):
    """Base class: str(error) is a complete one-line message; never shown with a traceback."""

    exit_status = 1


class UsageError(AgentError):
    """Bad input from the operator (CLI, YAML, ssh_config, a busy local port): exit status 2."""

    exit_status = 2


class ConnectError(AgentError):
    """An SSH connection attempt failed.

    `reason` is a short stable label (used as a metric label and in the status table), e.g.
    ``dns``, ``refused``, ``timeout``, ``auth_failed``, ``host_key_unknown``, ``host_key_changed``.
    `retry_after_min` lets failures that hammering cannot fix (auth, host keys) back off harder.
    """

    def __init__(self, reason: str, message: str, *, slow_retry: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.slow_retry = slow_retry


class HostKeyError(ConnectError):
    """The host key is unknown (and the policy is strict) or differs from known_hosts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message, slow_retry=True)
