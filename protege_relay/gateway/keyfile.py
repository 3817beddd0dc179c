"""Loading the persona's `passport.key` with one error type the commands turn into an exit code."""

from __future__ import annotations

from shared.identity import InvalidKey, Passport


class KeyFileError(Exception):
    """The key file is missing, unreadable or not an Ed25519 PKCS#8 PEM key."""


def load_passport(key_path: str) -> Passport:
    try:
        return Passport.load(key_path)
    except OSError as exc:
        raise KeyFileError(f"cannot read {key_path}: {exc.strerror}") from None
    except (InvalidKey, ValueError, TypeError) as exc:
        raise KeyFileError(f"{key_path} is not an Ed25519 PKCS#8 PEM key: {exc}") from None
