"""Persona identity: PROTOCOL.md A2 and the RFC 8032 test vector."""

from __future__ import annotations

import base64
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.identity import (
    InvalidKey,
    Passport,
    decode_public_key,
    decode_signature,
    encode_public_key,
    persona_key_of_local_part,
    verify_signature,
)
from tests.support import launcher

RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_BASE32 = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
CHALLENGE_TEXT = b"relay-auth:00000000-0000-4000-8000-000000000000:11111111-1111-4111-8111-111111111111"
CHALLENGE_SIGNATURE = "ZKDuPyQ3RIoOE9Alx2/i1iTyv2hJHemMPkJosXAsMJKRdsVB04Kraymw3PXXcivTGDxoI1kXCBBFc3gpx7LeCQ=="


def test_rfc8032_key_encodes_to_the_protocol_vector() -> None:
    passport = Passport.from_seed(RFC8032_SECRET)
    assert passport.public_key == RFC8032_PUBLIC
    assert passport.persona_key == RFC8032_BASE32 == encode_public_key(RFC8032_PUBLIC)
    assert decode_public_key(RFC8032_BASE32) == RFC8032_PUBLIC


def test_rfc8032_signature_of_challenge_is_the_protocol_vector() -> None:
    passport = Passport.from_seed(RFC8032_SECRET)
    assert passport.sign_base64(CHALLENGE_TEXT) == CHALLENGE_SIGNATURE
    assert verify_signature(RFC8032_PUBLIC, CHALLENGE_TEXT, decode_signature(CHALLENGE_SIGNATURE))


def test_unpadded_and_urlsafe_signatures_are_accepted() -> None:
    raw = base64.b64decode(CHALLENGE_SIGNATURE)
    assert decode_signature(CHALLENGE_SIGNATURE.rstrip("=")) == raw
    assert decode_signature(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw


@pytest.mark.parametrize("signature", ["", "!!!!", "AAAA", CHALLENGE_SIGNATURE[:-4], "é" * 88])
def test_bad_signatures_do_not_verify(signature: str) -> None:
    assert not verify_signature(RFC8032_PUBLIC, CHALLENGE_TEXT, decode_signature(signature))


def test_signature_over_other_bytes_does_not_verify() -> None:
    assert not verify_signature(RFC8032_PUBLIC, CHALLENGE_TEXT + b"x", decode_signature(CHALLENGE_SIGNATURE))


def test_key_decoding_trims_and_lowercases() -> None:
    assert decode_public_key(f"  {RFC8032_BASE32.upper()}\n") == RFC8032_PUBLIC


@pytest.mark.parametrize("length", [*range(0, 52), 53, 56, 60, 64, 100])
def test_keys_of_every_wrong_length_are_invalid(length: int) -> None:
    with pytest.raises(InvalidKey):
        decode_public_key(("a2" * 60)[:length])


@pytest.mark.parametrize(
    "bad", [RFC8032_BASE32[:-1] + "1", RFC8032_BASE32[:-1] + "=", "é" * 52, RFC8032_BASE32[:-1] + "b"]
)
def test_keys_outside_the_alphabet_or_with_stray_bits_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidKey):
        decode_public_key(bad)


@given(st.binary(min_size=32, max_size=32))
def test_every_32_byte_key_round_trips(raw: bytes) -> None:
    encoded = encode_public_key(raw)
    assert len(encoded) == 52 and decode_public_key(encoded) == raw


@given(st.text(max_size=80))
def test_decoding_arbitrary_text_only_raises_invalid_key(text: str) -> None:
    try:
        assert len(decode_public_key(text)) == 32
    except InvalidKey:
        pass


def test_plus_tag_is_ignored_for_routing() -> None:
    assert persona_key_of_local_part(f"{RFC8032_BASE32}+newsletter") == RFC8032_BASE32


def test_passport_round_trips_through_pkcs8_pem_with_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "passport.key"
    original = Passport.generate()
    original.save(path)
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Passport.load(path).persona_key == original.persona_key
    with pytest.raises(FileExistsError):
        original.save(path)


def test_keygen_prints_the_address_of_the_key_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "passport.key"
    result = launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "keygen", "--out", str(out), "--domain", "relay.test"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == f"{Passport.load(out).persona_key}@relay.test"
    again = launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "keygen", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
