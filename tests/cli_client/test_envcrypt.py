"""The env sealing and KMS signature check, against the test KMS peer's real keys."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from tests.support.kms_peer import OTHER_SIGNING_KEY, SIGNER, app_private_key, expected_answer
from vmm.cli_client import envcrypt

APP_ID = bytes.fromhex("12" * 20)


def test_signer_recovered_from_v1_and_legacy_signatures() -> None:
    """signature_v1 (with timestamp) is preferred; the legacy signature recovers the same signer."""
    answer = expected_answer(APP_ID)
    key = envcrypt.check_kms_answer(APP_ID, answer)
    assert (key.signer.hex(), key.signed_with) == (SIGNER, "signature_v1")
    legacy = envcrypt.check_kms_answer(APP_ID, {**answer, "signature_v1": ""})
    assert (legacy.signer.hex(), legacy.signed_with) == (SIGNER, "signature")


def test_a_changed_key_app_or_timestamp_recovers_another_signer() -> None:
    """Tampering with any signed field changes the recovered signer, so the whitelist catches it."""
    answer = expected_answer(APP_ID)
    tampered_key = {**answer, "public_key": "00" * 32}
    assert envcrypt.check_kms_answer(APP_ID, tampered_key).signer.hex() != SIGNER
    assert envcrypt.check_kms_answer(bytes(20), answer).signer.hex() != SIGNER
    assert envcrypt.check_kms_answer(APP_ID, {**answer, "timestamp": 1}).signer.hex() != SIGNER
    other = envcrypt.check_kms_answer(APP_ID, expected_answer(APP_ID, OTHER_SIGNING_KEY))
    assert other.signer == OTHER_SIGNING_KEY.public_key.format(compressed=True)


def test_malformed_answers_are_refused() -> None:
    """No signature, a short one, or a key of the wrong size is a SignatureError."""
    answer = expected_answer(APP_ID)
    with pytest.raises(envcrypt.SignatureError, match="no signature"):
        envcrypt.check_kms_answer(APP_ID, {**answer, "signature": "", "signature_v1": ""})
    with pytest.raises(envcrypt.SignatureError, match="expected 65"):
        envcrypt.check_kms_answer(APP_ID, {**answer, "signature_v1": "00" * 64})
    with pytest.raises(envcrypt.SignatureError, match="expected 32"):
        envcrypt.check_kms_answer(APP_ID, {**answer, "public_key": "00" * 31})
    with pytest.raises(envcrypt.SignatureError, match="malformed"):
        envcrypt.check_kms_answer(APP_ID, {**answer, "public_key": "zz"})


def test_sealed_env_opens_with_the_kms_key_only() -> None:
    """encrypt_env's blob is eph_pub(32)||iv(12)||ct+tag and opens with the app's private key."""
    public_key = bytes.fromhex(str(expected_answer(APP_ID)["public_key"]))
    blob = envcrypt.encrypt_env({"K": "v"}, public_key)
    assert len(blob) == 32 + 12 + len(envcrypt.env_plaintext({"K": "v"})) + 16
    assert envcrypt.decrypt_env(blob, app_private_key(APP_ID)) == {"K": "v"}
    assert envcrypt.encrypt_env({"K": "v"}, public_key) != blob  # fresh key and IV each time
    with pytest.raises(InvalidTag):
        envcrypt.decrypt_env(blob, app_private_key(bytes(20)))


def test_normalize_signer() -> None:
    """Whitelist entries are 33-byte compressed keys, stored lowercase without 0x."""
    assert envcrypt.normalize_signer(f"0x{SIGNER.upper()}") == SIGNER
    for bad in ("0x1234", "zz", "04" + "00" * 32):
        with pytest.raises(ValueError, match="not"):
            envcrypt.normalize_signer(bad)
