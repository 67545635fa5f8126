"""Prometheus file-based service discovery: one target per forward, written atomically.

Each target is `<sd host>:<local port>` labelled with the forward's name as `job`, the production host
and remote port as `instance`, the host's name as `host`, and the host's free labels, so dashboards and
alerts name the production host, never "localhost:9121".
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import AgentConfig
from .errors import UsageError

RESERVED_LABELS = ("job", "instance", "host")


def file_sd_targets(config: AgentConfig) -> list[dict[str, object]]:
    """The file_sd document for every forward of every host, in config order."""
    groups: list[dict[str, object]] = []
    for host in config.hosts:
        extra = {k: str(v) for k, v in host.labels.items() if k not in RESERVED_LABELS}
        for forward in host.forwards:
            labels = {**extra, "job": forward.name, "instance": f"{host.name}:{forward.remote_port}",
                      "host": host.name}
            groups.append({"targets": [f"{config.sd_target_host}:{forward.local_port}"], "labels": labels})
    return groups


def write_file_sd(path: Path, config: AgentConfig) -> None:
    """Write the targets to `path` atomically (temp file in the same directory, then rename)."""
    document = json.dumps(file_sd_targets(config), indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write the file_sd targets to {path} ({exc.strerror}): "
                         "choose a writable --sd-file path") from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(document)
        os.chmod(temp, 0o644)  # Prometheus (another user, or a container) must read it
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
