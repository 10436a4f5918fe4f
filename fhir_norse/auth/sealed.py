"""Small secrets the server keeps for others (a Subscription's ``channel.header`` values), sealed at rest.

AES-256-GCM (the ``cryptography`` library) under a key derived with scrypt from the passphrase that
encrypts the server's signing keys (``FHIR_NORSE_KEY_PASSPHRASE``: :func:`.keys.passphrase_from`).
Each value gets a fresh 96-bit nonce and is bound to what it belongs to (the associated data, e.g. the
Subscription's id), so a sealed value copied to another row does not open. The derived key is computed
once per process (scrypt is deliberately slow). Changing the passphrase makes stored values unreadable:
the owners must send them again.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

# A fixed, public salt: the passphrase is the secret (at least 16 characters outside development).
_SALT = b"fhir-norse/sealed/v1"
_PREFIX = "v1."
_DERIVED: dict[bytes, bytes] = {}


class SealError(Exception):
    """A sealed value that does not open (another passphrase, another owner, or damaged)."""


class Sealer:
    """Seals and opens values with the key derived from ``passphrase`` (module doc)."""

    def __init__(self, passphrase: str) -> None:
        secret = passphrase.encode()
        key = _DERIVED.get(secret)
        if key is None:
            key = Scrypt(salt=_SALT, length=32, n=2**14, r=8, p=1).derive(secret)
            _DERIVED[secret] = key
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, owner: str) -> str:
        """``plaintext`` sealed for ``owner`` (text, safe to store)."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, owner.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, owner: str) -> bytes:
        """The plaintext of ``token`` sealed for ``owner`` (:class:`SealError` if it does not open)."""
        if not token.startswith(_PREFIX):
            raise SealError("not a sealed value of this server")
        try:
            raw = base64.urlsafe_b64decode(token[len(_PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], owner.encode())
        except (InvalidTag, ValueError) as exc:
            raise SealError(
                "the sealed value does not open (was FHIR_NORSE_KEY_PASSPHRASE changed?)"
            ) from exc
