"""Persona identity: an Ed25519 public key is the address (PROTOCOL.md A2).

There are no accounts, so every rule about who a persona is lives here: encoding a key as
the 52-character base32 local part, decoding it strictly, verifying signatures, and reading
and writing the gateway's PKCS#8 `passport.key`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PUBLIC_KEY_BYTES = 32
PUBLIC_KEY_BASE32_CHARS = 52
SIGNATURE_BYTES = 64
_BASE32_ALPHABET = re.compile(r"[a-z2-7]+")


class InvalidKey(ValueError):
    """A string that is not a persona public key in base32."""


def encode_public_key(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_public_key(text: str) -> bytes:
    """Trim, lowercase, alphabet a-z2-7 only, exactly 32 bytes — else InvalidKey."""
    normalized = text.strip().lower()
    if len(normalized) != PUBLIC_KEY_BASE32_CHARS or not _BASE32_ALPHABET.fullmatch(normalized):
        raise InvalidKey("not a 52-character base32 public key")
    padded = normalized.upper() + "=" * (-len(normalized) % 8)
    try:
        raw = base64.b32decode(padded)
    except binascii.Error:
        raise InvalidKey("not base32") from None
    if len(raw) != PUBLIC_KEY_BYTES or encode_public_key(raw) != normalized:
        raise InvalidKey("not 32 bytes")
    return raw


def is_public_key(text: str) -> bool:
    try:
        decode_public_key(text)
    except InvalidKey:
        return False
    return True


def persona_key_of_local_part(local_part: str) -> str:
    """Routing key of a local part: `+tag` ignored, case folded. Raises InvalidKey."""
    base = local_part.split("+", 1)[0].strip().lower()
    decode_public_key(base)
    return base


def persona_address(persona_key: str, domain: str) -> str:
    return f"{persona_key}@{domain}" if domain else persona_key


def decode_signature(text: str) -> bytes:
    """Standard base64 with padding, also unpadded and URL-safe (as the original accepts)."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return b""


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


class Passport:
    """A persona's private key, in the gateway's PKCS#8 PEM format."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key

    @classmethod
    def generate(cls) -> Passport:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Passport:
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: str | Path) -> Passport:
        private_key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise InvalidKey(f"{path} does not hold an Ed25519 private key")
        seed = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls.from_seed(seed)

    def save(self, path: str | Path) -> None:
        """Write PKCS#8 PEM readable by the owner only; refuses to overwrite."""
        pem = Ed25519PrivateKey.from_private_bytes(bytes(self._signing_key)).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def persona_key(self) -> str:
        return encode_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._signing_key.sign(message).signature)

    def sign_base64(self, message: bytes) -> str:
        return base64.b64encode(self.sign(message)).decode("ascii")
