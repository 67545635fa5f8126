"""Public-key authentication only: keys from ssh-agent, then identity files (never passwords).

Identity files are read once at start-up so that a missing, unreadable or passphrase-protected key is
a usage error with a fix, not a reconnect loop. A passphrase-protected key is fine when ssh-agent holds it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import paramiko

from .errors import ConnectError, UsageError
from .sshconfig import DEFAULT_IDENTITIES

log = logging.getLogger(__name__)


@dataclass
class Identities:
    """The keys to offer to one host, in order."""

    files: list[tuple[str, paramiko.PKey]] = field(default_factory=list)
    use_agent: bool = True
    locked: list[str] = field(default_factory=list)  # passphrase-protected files (usable via the agent)

    def agent_keys(self) -> list[paramiko.PKey]:
        if not self.use_agent or not os.environ.get("SSH_AUTH_SOCK"):
            return []
        try:
            return list(paramiko.Agent().get_keys())
        except (paramiko.SSHException, OSError) as exc:
            log.debug("ssh-agent not usable: %s", exc)
            return []


def load_identities(paths: Sequence[str], identities_only: bool = False) -> Identities:
    """Load the given identity files (or OpenSSH's defaults when none are given)."""
    explicit = bool(paths)
    candidates = list(paths) if explicit else list(DEFAULT_IDENTITIES)
    result = Identities(use_agent=not identities_only)
    for raw in candidates:
        path = Path(os.path.expanduser(raw))
        if not path.exists():
            if explicit:
                raise UsageError(f"identity file {path} does not exist: check the -i/IdentityFile path")
            continue
        try:
            key = paramiko.PKey.from_path(str(path))
        except PermissionError:
            raise UsageError(f"identity file {path} is not readable: fix its permissions (chmod 600)") from None
        except paramiko.PasswordRequiredException:
            result.locked.append(str(path))
            continue
        except TypeError as exc:  # paramiko 4+/cryptography: "Key is password-protected, but ..."
            if "password" not in str(exc).lower():
                raise
            result.locked.append(str(path))
            continue
        except (paramiko.SSHException, ValueError, OSError) as exc:
            raise UsageError(f"identity file {path} is not a usable private key ({exc}): "
                             "pass a private key (not the .pub) in OpenSSH or PEM format") from None
        result.files.append((str(path), key))
    if explicit and not result.files and result.locked and not result.agent_keys():
        locked = result.locked[0]
        raise UsageError(f"identity file {locked} is passphrase-protected and no ssh-agent holds a key: "
                         f"run `eval $(ssh-agent) && ssh-add {locked}` and start again")
    return result


def authenticate(transport: paramiko.Transport, user: str, identities: Identities) -> str:
    """Try agent keys then identity files; return a description of what worked."""
    offered = 0
    for key in identities.agent_keys():
        offered += 1
        if _try(transport, user, key):
            return f"publickey (ssh-agent {key.get_name()})"
    for path, key in identities.files:
        offered += 1
        if _try(transport, user, key):
            return f"publickey ({path})"
    if offered == 0:
        hint = (f"{identities.locked[0]} is passphrase-protected: add it to ssh-agent" if identities.locked
                else "pass one with -i, set IdentityFile, or load one into ssh-agent")
        raise ConnectError("no_key", f"no usable key to offer for {user}: {hint}", slow_retry=True)
    raise ConnectError("auth_failed",
                       f"authentication failed for {user}: the host accepted none of {offered} key(s); "
                       f"check ~{user}/.ssh/authorized_keys on the host (or -i)", slow_retry=True)


def _try(transport: paramiko.Transport, user: str, key: paramiko.PKey) -> bool:
    try:
        transport.auth_publickey(user, key)
    except paramiko.BadAuthenticationType as exc:
        raise ConnectError("auth_failed", f"the host does not accept public keys for {user} "
                           f"(allowed: {', '.join(exc.allowed_types)}): enable PubkeyAuthentication",
                           slow_retry=True) from None
    except paramiko.AuthenticationException:
        return False
    return transport.is_authenticated()
