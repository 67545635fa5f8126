"""Host-key checking with OpenSSH's known_hosts files and semantics.

- A known host whose key matches: accepted.
- A known host presenting a different key: always refused, loudly (possible man-in-the-middle).
- An unknown host: refused under StrictHostKeyChecking=yes (the default) with the commands to verify and
  add the key; recorded in the first UserKnownHostsFile under accept-new (trust on first use).
Hashed entries (HashKnownHosts), comma lists, wildcards, negations, [host]:port and @revoked are
understood; @cert-authority lines are ignored (no certificate support).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import paramiko

from .errors import HostKeyError

log = logging.getLogger(__name__)

#: known_hosts key type -> host key algorithms to prefer in the handshake, so that the server shows
#: the key we already know (as OpenSSH orders HostKeyAlgorithms).
_ALGORITHMS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint, e.g. SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def host_pattern(hostname: str, port: int) -> str:
    """The name a host has in known_hosts: `host` on port 22, `[host]:port` otherwise."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


@dataclass(frozen=True)
class KnownKey:
    """One usable line of a known_hosts file."""

    file: Path
    lineno: int
    key_type: str
    blob: bytes
    revoked: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


def _matches(name: str, patterns: str) -> bool:
    """OpenSSH host-pattern matching for one known_hosts host field."""
    if patterns.startswith("|1|"):
        try:
            _, _, salt64, hash64 = patterns.split("|")
            salt = base64.b64decode(salt64)
            expected = base64.b64decode(hash64)
        except (ValueError, binascii.Error):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern.lstrip("!")).fullmatch(name.lower()):
            if negated:
                return False
            matched = True
    return matched


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH's pattern syntax: only `*` and `?` are special (`[` is literal, as in [host]:port)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


def read_known_keys(files: Iterable[str | Path], name: str) -> list[KnownKey]:
    """Every key recorded for `name` (as given by host_pattern) in the given files, in order."""
    found: list[KnownKey] = []
    for file in files:
        path = Path(os.path.expanduser(str(file)))
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for lineno, raw in enumerate(lines, 1):
            fields = raw.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = None
            if fields[0].startswith("@"):
                marker, fields = fields[0], fields[1:]
            if len(fields) < 3 or marker == "@cert-authority":
                continue
            if not _matches(name, fields[0]):
                continue
            try:
                blob = base64.b64decode(fields[2], validate=True)
            except (binascii.Error, ValueError):
                log.warning("%s:%d: unreadable key, line ignored", path, lineno)
                continue
            found.append(KnownKey(path, lineno, fields[1], blob, revoked=marker == "@revoked"))
    return found


class HostKeyChecker:
    """Decides whether a presented host key may be used, per StrictHostKeyChecking."""

    def __init__(self, user_files: Sequence[str], global_files: Sequence[str] = (), policy: str = "yes") -> None:
        self.user_files = [Path(os.path.expanduser(f)) for f in user_files]
        self.global_files = [Path(os.path.expanduser(f)) for f in global_files]
        self.policy = policy

    def known(self, hostname: str, port: int) -> list[KnownKey]:
        return read_known_keys([*self.user_files, *self.global_files], host_pattern(hostname, port))

    def preferred_algorithms(self, hostname: str, port: int, offered: Sequence[str]) -> list[str]:
        """Host key algorithms with the types we know for this host first."""
        first: list[str] = []
        for entry in self.known(hostname, port):
            for algorithm in _ALGORITHMS.get(entry.key_type, (entry.key_type,)):
                if algorithm in offered and algorithm not in first:
                    first.append(algorithm)
        return first + [a for a in offered if a not in first]

    def check(self, hostname: str, port: int, key: paramiko.PKey) -> str:
        """Return how the key was accepted ('known' or 'added'); raise HostKeyError otherwise."""
        name = host_pattern(hostname, port)
        key_type, blob = key.get_name(), key.asbytes()
        presented = f"{key_type} {fingerprint(blob)}"
        entries = self.known(hostname, port)
        for entry in entries:
            if entry.revoked and entry.blob == blob:
                raise HostKeyError("host_key_revoked",
                                   f"host key of {name} ({presented}) is marked @revoked in {entry.where}: "
                                   "refusing to connect")
        if any(e.blob == blob and not e.revoked for e in entries):
            return "known"
        usable = [e for e in entries if not e.revoked]
        if usable:
            old = usable[0]
            raise HostKeyError(
                "host_key_changed",
                f"HOST KEY CHANGED for {name}: {old.where} has {old.key_type} {fingerprint(old.blob)} but the "
                f"host presents {presented} - someone may be intercepting the connection; refusing. If the host "
                f"was really re-keyed, verify the new key out of band, then run: ssh-keygen -R '{name}' -f {old.file}",
            )
        if self.policy == "accept-new":
            self._record(name, key)
            return "added"
        target = self.user_files[0] if self.user_files else Path("~/.ssh/known_hosts")
        port_opt = "" if port == 22 else f"-p {port} "
        raise HostKeyError(
            "host_key_unknown",
            f"host key of {name} is not known ({presented}): compare it with `ssh-keygen -lf "
            f"/etc/ssh/ssh_host_{_file_stem(key_type)}_key.pub` run on the host, then add it with "
            f"`ssh-keyscan {port_opt}{hostname} >> {target}` (or run once with -o StrictHostKeyChecking=accept-new)",
        )

    def _record(self, name: str, key: paramiko.PKey) -> None:
        if not self.user_files:
            raise HostKeyError("host_key_unknown", f"host key of {name} is unknown and no UserKnownHostsFile is set")
        path = self.user_files[0]
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(line)
        log.warning("permanently added %s (%s %s) to %s", name, key.get_name(), fingerprint(key.asbytes()), path)


def _file_stem(key_type: str) -> str:
    if "ed25519" in key_type:
        return "ed25519"
    if "ecdsa" in key_type:
        return "ecdsa"
    return "rsa"
