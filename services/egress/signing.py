"""DKIM signing of outbound mail (`dkim.*` config), after line endings are normalised.

The key file may be an RSA private key (PEM, `rsa-sha256`) or an Ed25519 PKCS#8 key
(`ed25519-sha256`, RFC 8463). Header names come from `dkim.headerFieldNames` (a
colon-separated string, as in the original relay, or a list) minus `dkim.skipFields`; when
none are configured dkimpy's recommended set is signed. `From` is always signed (RFC 6376
requires it) and headers that must not be signed (e.g. `Return-Path`) are dropped.
"""

from __future__ import annotations

import base64
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.config import DkimConfig
from shared.secrets import read_secret_file

CANONICALIZATION = (b"relaxed", b"relaxed")


def header_names(value: str | list[str]) -> list[str]:
    """Lowercased header names from "a:b:c" or ["a", "b:c"], blanks dropped, order kept.

    Items of a list are split on ":" as well: `RELAY_DKIM_HEADER_FIELD_NAMES=from:to` arrives
    as the one-item list ["from:to"], since the variable's type also allows a list.
    """
    items = [value] if isinstance(value, str) else value
    names: list[str] = []
    for item in items:
        for part in item.split(":"):
            name = part.strip().lower()
            if name and name not in names:
                names.append(name)
    return names


class DkimSigner:
    def __init__(self, config: DkimConfig) -> None:
        self._domain = config.domainName.encode("ascii")
        self._selector = config.keySelector.encode("ascii")
        self._key, self._algorithm = _load_key(Path(config.privateKeyPath))
        self._skip = set(header_names(config.skipFields))
        self._configured = [name for name in header_names(config.headerFieldNames) if name not in self._skip]

    @classmethod
    def from_config(cls, config: DkimConfig) -> DkimSigner | None:
        return cls(config) if config.enabled else None

    def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature header prepended; `message` must use CRLF."""
        signer = dkim.DKIM(message, linesep=b"\r\n")
        if self._configured:
            wanted = [name.encode("ascii") for name in self._configured]
        else:
            wanted = [name.lower() for name in signer.default_sign_headers()]
            wanted = [name for name in wanted if name.decode("ascii") not in self._skip]
        include = [name for name in wanted if name not in signer.should_not_sign]
        if b"from" not in include:
            include.insert(0, b"from")
        signature: bytes = signer.sign(
            self._selector,
            self._domain,
            self._key,
            signature_algorithm=self._algorithm,
            canonicalize=CANONICALIZATION,
            include_headers=include,
        )
        if not signature.endswith(b"\r\n"):
            signature += b"\r\n"
        return signature + message


def _load_key(path: Path) -> tuple[bytes, bytes]:
    """(key material as dkimpy wants it, signature algorithm)."""
    pem = read_secret_file(path, purpose="dkim.privateKeyPath")
    private_key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(private_key, Ed25519PrivateKey):
        seed = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(seed), b"ed25519-sha256"
    traditional = private_key.private_bytes(  # dkimpy parses PKCS#1 only; accept PKCS#8 too
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return traditional, b"rsa-sha256"
