#!/usr/bin/python3
"""Writes the fuzzer's seed corpus: real pgphi v1 ciphertexts of both
algorithms under the fuzz target's fixed DEK (bytes 0..31), plus damaged
ones. Run once; the output is committed in corpus/ciphertext."""
import os
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus", "ciphertext")
os.makedirs(out, exist_ok=True)
key = bytes(range(32))
prefix = bytes([0xA7, 1, 1]) + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
for i, plaintext in enumerate([b"", b"123-45-6789", b"John Smith", b'{"dx": "E11.9"}', bytes(range(256))]):
    nonce = bytes([i]) * 12
    value = prefix + nonce + AESGCM(key).encrypt(nonce, plaintext, prefix)
    open(os.path.join(out, f"valid-{i}"), "wb").write(value)
    open(os.path.join(out, f"truncated-{i}"), "wb").write(value[: len(value) // 2])
    flipped = bytearray(value)
    flipped[-1] ^= 1
    open(os.path.join(out, f"flipped-{i}"), "wb").write(bytes(flipped))

# Deterministic values: AES-256-SIV under the key HKDF derives from the DEK,
# over a zero byte and the plaintext, with the prefix as associated data.
siv_key = HKDF(hashes.SHA256(), 64, None, b"pgphi v1 AES-256-SIV key").derive(key)
siv_prefix = bytes([0xA7, 1, 2]) + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
for i, plaintext in enumerate([b"", b"123-45-6789", b"MRN-0042", bytes(range(256))]):
    value = siv_prefix + AESSIV(siv_key).encrypt(b"\x00" + plaintext, [siv_prefix])
    open(os.path.join(out, f"siv-valid-{i}"), "wb").write(value)
    open(os.path.join(out, f"siv-truncated-{i}"), "wb").write(value[: len(value) // 2])
    flipped = bytearray(value)
    flipped[-1] ^= 1
    open(os.path.join(out, f"siv-flipped-{i}"), "wb").write(bytes(flipped))
open(os.path.join(out, "not-ciphertext"), "wb").write(b"123-45-6789")
