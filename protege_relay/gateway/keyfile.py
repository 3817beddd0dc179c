"""Loading the persona's `passport.key` with one error type the commands turn into an exit code.

The key is the persona's identity, so it passes the same checks as every other private key
the relay reads (`shared.secrets`): a file group or others could read is refused.
"""

from __future__ import annotations

from shared.identity import Passport
from shared.secrets import SecretFileError, load_signing_key


class KeyFileError(Exception):
    """The key file is missing, unreadable, readable by others or not an Ed25519 PKCS#8 PEM key."""


def load_passport(key_path: str) -> Passport:
    try:
        return load_signing_key(key_path, purpose="persona key")
    except SecretFileError as exc:
        raise KeyFileError(str(exc)) from None
