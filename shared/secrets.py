"""Reading private key files: refuse a key anyone else on the machine could have read.

A signing or TLS key that is group- or world-readable may already be copied, so the relay
refuses to start with it instead of quietly trusting it (the rule OpenSSH applies to its
identity files). One exception, the one PostgreSQL makes for its TLS key: a file owned by
root may be group-readable (at most 0o640). That is exactly how Kubernetes projects a Secret
volume with `defaultMode: 0400` into a pod with `fsGroup` (root-owned, mode 0440), the
deployment in `deploy/k8s`.

Symlinks are followed (Kubernetes Secret files are symlinks into `..data/`): the mode and
type checked are those of the file actually opened (`fstat` on the open descriptor, so the
file cannot be swapped between the check and the read). Errors name the path and the
problem, never the content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.identity import Passport

MAX_SECRET_FILE_BYTES = 1024 * 1024
FORBIDDEN_MODE_BITS = 0o077  # any group or other permission
FORBIDDEN_MODE_BITS_ROOT_OWNED = 0o037  # root-owned: group read allowed, nothing more
ROOT_UID = 0


class SecretFileError(Exception):
    """A key file that is missing, not a regular file, too open, or not a key of the right kind."""


def read_secret_file(path: str | Path, *, purpose: str) -> bytes:
    """The bytes of a private key file after the ownership and mode checks above."""
    if not str(path):
        raise SecretFileError(f"{purpose}: no key file path configured")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretFileError(f"{purpose}: cannot open {path}: {exc.strerror}") from None
    try:
        status = os.fstat(fd)
        check_secret_status(status, path, purpose=purpose)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            content = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise SecretFileError(f"{purpose}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(content) > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"{purpose}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    return content


def check_secret_status(status: os.stat_result, path: str | Path, *, purpose: str) -> None:
    """Raise unless `status` describes a regular file only its owner (or root's group) can read."""
    if not stat.S_ISREG(status.st_mode):
        raise SecretFileError(f"{purpose}: {path} is not a regular file")
    mode = stat.S_IMODE(status.st_mode)
    forbidden = FORBIDDEN_MODE_BITS_ROOT_OWNED if status.st_uid == ROOT_UID else FORBIDDEN_MODE_BITS
    if mode & forbidden:
        raise SecretFileError(
            f"{purpose}: {path} has mode {mode:04o}; it must not be readable by group or others (chmod 600 {path})"
        )


def load_signing_key(path: str | Path, *, purpose: str) -> Passport:
    """An Ed25519 private key in PKCS#8 PEM (the format `Passport.save` writes)."""
    pem = read_secret_file(path, purpose=purpose)
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SecretFileError(f"{purpose}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SecretFileError(f"{purpose}: {path} does not hold an Ed25519 private key")
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return Passport.from_seed(seed)


__all__ = ["SecretFileError", "check_secret_status", "load_signing_key", "read_secret_file"]
