"""Auth-rate baseline (its own process): PyNaCl signature verifications per second, one process.

Verifies an 88-character-base64 Ed25519 signature of an 84-byte challenge text, the exact work
a tunnel does once per handshake, in a tight loop for `--seconds`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import nacl.signing

CHALLENGE_TEXT = b"relay-auth:00000000-0000-4000-8000-000000000000:11111111-1111-4111-8111-111111111111"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    signing_key = nacl.signing.SigningKey.generate()
    signature = signing_key.sign(CHALLENGE_TEXT).signature
    public_key = bytes(signing_key.verify_key)
    count = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            nacl.signing.VerifyKey(public_key).verify(CHALLENGE_TEXT, signature)
        count += 100
    elapsed_s = time.perf_counter() - started
    sys.stdout.write(json.dumps({"count": count, "seconds": elapsed_s, "rate": count / elapsed_s}) + "\n")


if __name__ == "__main__":
    main()
