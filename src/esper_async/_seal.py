"""The optional key that seals checkpoints and kernel bundles (HMAC-SHA256).

A sha256 digest written beside a file detects damage, not forgery: whoever can write the file
can write a matching digest. With a key, the writer also records ``HMAC-SHA256(key, content)``,
and a reader holding the same key refuses a file whose seal is missing, made with another key
or does not match its content, as a forgery (never skipped as damage). Without a key nothing
is sealed or checked, as before.

The key is given as an argument where a reader or writer takes one, or else read from the
environment variable :data:`SEAL_KEY_ENV` (its UTF-8 bytes). Use a long random secret, e.g.
``python -c "import secrets; print(secrets.token_hex(32))"``, and keep it out of the run
directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os

__all__ = ("SEAL_KEY_ENV", "SEAL_SIZE", "resolve_key", "seal_matches", "seal_of")

#: The environment variable a key is read from when none is given.
SEAL_KEY_ENV = "ESPER_SEAL_KEY"
#: Bytes of one seal (an HMAC-SHA256).
SEAL_SIZE = 32


def resolve_key(key: bytes | str | None = None) -> bytes | None:
    """The sealing key: ``key`` if given, else ``$ESPER_SEAL_KEY``; ``None`` if neither is set
    (an empty value counts as unset).

    :param key: a key given by the caller (``str`` keys are taken as UTF-8).
    """
    if key is None:
        key = os.environ.get(SEAL_KEY_ENV) or None
    if isinstance(key, str):
        key = key.encode("utf-8")
    return key or None


def seal_of(key: bytes, data: bytes | memoryview) -> bytes:
    """``HMAC-SHA256(key, data)``."""
    return hmac.new(key, data, hashlib.sha256).digest()


def seal_matches(key: bytes, data: bytes | memoryview, seal: bytes) -> bool:
    """Whether ``seal`` is ``data``'s seal under ``key`` (compared in constant time)."""
    return hmac.compare_digest(seal_of(key, data), seal)
