"""Helpers for the sender-authentication tests: a sender domain with SPF, DKIM and DMARC
records served by the local DNS server, and DKIM signing with a generated RSA key."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SENDER_DOMAIN = "sender.test"
SELECTOR = "sel1"
HONEST_IP = "127.0.0.1"
FOREIGN_IP = "127.0.0.2"  # a loopback address the sender's SPF does not list
TXT_CHUNK_CHARS = 250


def txt(text: str) -> str:
    """TXT rdata text: the value as quoted character-strings of at most 255 bytes."""
    chunks = [text[index : index + TXT_CHUNK_CHARS] for index in range(0, len(text), TXT_CHUNK_CHARS)]
    return " ".join(f'"{chunk}"' for chunk in chunks)


@dataclass(frozen=True)
class DkimKey:
    private_pem: bytes
    public_base64: str

    def record(self) -> str:
        return txt(f"v=DKIM1; k=rsa; p={self.public_base64}")

    def sign(self, message: bytes, domain: str = SENDER_DOMAIN, selector: str = SELECTOR) -> bytes:
        signature: bytes = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            self.private_pem,
            include_headers=[b"from", b"to", b"subject", b"date"],
        )
        return signature + message


@functools.cache
def dkim_key() -> DkimKey:
    """One 2048-bit RSA key per test run (generating one costs ~100 ms)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(private_pem, base64.b64encode(public_der).decode("ascii"))


def sender_zones(
    domain: str = SENDER_DOMAIN, spf: str = f"v=spf1 ip4:{HONEST_IP} -all", dmarc: str = "v=DMARC1; p=reject"
) -> dict[str, dict[str, list[str]]]:
    """SPF at the domain, the DKIM key at `<selector>._domainkey`, DMARC at `_dmarc`."""
    return {
        domain: {"TXT": [txt(spf)]},
        f"{SELECTOR}._domainkey.{domain}": {"TXT": [dkim_key().record()]},
        f"_dmarc.{domain}": {"TXT": [txt(dmarc)]},
    }


def message_from(author: str, subject: str = "hello", body: str = "body line") -> bytes:
    return (
        f"From: Alice <{author}>\r\nTo: someone@relay.test\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


__all__ = [
    "FOREIGN_IP",
    "HONEST_IP",
    "SELECTOR",
    "SENDER_DOMAIN",
    "DkimKey",
    "dkim_key",
    "message_from",
    "sender_zones",
    "txt",
]
