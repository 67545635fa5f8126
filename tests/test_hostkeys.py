"""known_hosts semantics as OpenSSH has them (unit level; the live refusals are in test_tunnel.py)."""
from __future__ import annotations

import base64
import hashlib
import hmac

import paramiko
import pytest

from agent.errors import HostKeyError
from agent.hostkeys import HostKeyChecker, fingerprint, host_pattern

KEY = paramiko.ECDSAKey.generate()
OTHER = paramiko.ECDSAKey.generate()


def line(pattern: str, key: paramiko.PKey = KEY, marker: str = "") -> str:
    return f"{marker + ' ' if marker else ''}{pattern} {key.get_name()} {key.get_base64()}\n"


def hashed(name: str) -> str:
    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


@pytest.mark.parametrize("pattern, host, port", [
    ("10.0.0.5", "10.0.0.5", 22),
    ("[10.0.0.5]:2222", "10.0.0.5", 2222),  # brackets are literal, not a character class
    ("other,10.0.0.*", "10.0.0.7", 22),
    ("prod-?", "prod-1", 22),
    (hashed("[h]:2200"), "h", 2200),
    ("PROD", "prod", 22),
])
def test_known_key_is_accepted(tmp_path, pattern, host, port):
    known = tmp_path / "known_hosts"
    known.write_text("# comment\n\n" + line(pattern))
    assert HostKeyChecker([str(known)]).check(host, port, KEY) == "known"


def test_negation_and_port_mismatch_are_unknown(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(line("10.0.0.*,!10.0.0.7") + line("[10.0.1.8]:2222"))
    for host, port in (("10.0.0.7", 22), ("10.0.1.8", 22)):
        with pytest.raises(HostKeyError) as error:
            HostKeyChecker([str(known)]).check(host, port, KEY)
        assert error.value.reason == "host_key_unknown"


def test_unknown_key_message_says_how_to_verify_and_add(tmp_path):
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError) as error:
        HostKeyChecker([str(known)]).check("10.0.0.5", 2222, KEY)
    message = str(error.value)
    assert fingerprint(KEY.asbytes()) in message and "ssh-keyscan -p 2222 10.0.0.5" in message
    assert "accept-new" in message and "\n" not in message
    assert not known.exists(), "strict checking must never write known_hosts"


def test_changed_key_is_refused_even_with_accept_new(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(line("10.0.0.5", OTHER))
    with pytest.raises(HostKeyError) as error:
        HostKeyChecker([str(known)], policy="accept-new").check("10.0.0.5", 22, KEY)
    assert error.value.reason == "host_key_changed"
    assert "HOST KEY CHANGED" in str(error.value) and "ssh-keygen -R" in str(error.value)
    assert known.read_text() == line("10.0.0.5", OTHER)


def test_accept_new_records_the_key_once(tmp_path):
    known = tmp_path / "sub" / "known_hosts"
    checker = HostKeyChecker([str(known)], policy="accept-new")
    assert checker.check("10.0.0.5", 2222, KEY) == "added"
    assert known.read_text() == line(host_pattern("10.0.0.5", 2222))
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    assert checker.check("10.0.0.5", 2222, KEY) == "known"


def test_revoked_key_is_refused(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(line("*", KEY, marker="@revoked") + line("10.0.0.5"))
    with pytest.raises(HostKeyError) as error:
        HostKeyChecker([str(known)]).check("10.0.0.5", 22, KEY)
    assert error.value.reason == "host_key_revoked"


def test_known_key_type_is_preferred_in_the_handshake(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(line("h"))
    offered = ["ssh-ed25519", "rsa-sha2-512", "ecdsa-sha2-nistp256"]
    assert HostKeyChecker([str(known)]).preferred_algorithms("h", 22, offered)[0] == "ecdsa-sha2-nistp256"
