"""The cryptographic pieces of secure aggregation, each from a maintained library:
X25519 key agreement, HKDF-SHA256, AES-GCM and the ChaCha20 stream as a PRG from
`cryptography`; Shamir secret sharing over GF(2^128) from `pycryptodome`. Nothing here is a
hand-written primitive; this module only names how they are combined (Bell et al., 2020).

Fixed-point encoding: values are scaled by 2^SCALE_BITS, rounded, and taken modulo 2^64 (numpy's
uint64 arithmetic wraps), so a sum of encodings decodes to the sum of the values as long as
it stays within +-2^(63 - SCALE_BITS).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SCALE_BITS = 24
SEED_BYTES = 16  # a self-mask seed; Shamir shares 16-byte secrets


def new_keypair() -> tuple[X25519PrivateKey, np.ndarray]:
    sk = X25519PrivateKey.generate()
    return sk, np.frombuffer(sk.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw), dtype=np.uint8).copy()


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(sk: X25519PrivateKey, peer_pk: np.ndarray, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 shared secret."""
    shared = sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_pk)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """n pseudo-random uint64 from a seed (ChaCha20 keystream; a 16-byte seed is stretched by HKDF)."""
    key = seed if len(seed) == 32 else HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                            info=b"fedtune-secagg prg").derive(seed)
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)), dtype=np.uint64).copy()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> np.ndarray:
    """AES-GCM with a random nonce; the associated data binds sender, recipient and round."""
    import os

    nonce = os.urandom(12)
    return np.frombuffer(nonce + AESGCM(key).encrypt(nonce, plaintext, aad), dtype=np.uint8).copy()


def open_sealed(key: bytes, sealed: np.ndarray, aad: bytes) -> bytes:
    raw = bytes(sealed)
    return AESGCM(key).decrypt(raw[:12], raw[12:], aad)  # raises InvalidTag on any change or replay


def split_secret(secret: bytes, threshold: int, n: int) -> list[tuple[int, bytes]]:
    """Shamir shares (index 1..n) of a 16-byte secret; any `threshold` of them recover it."""
    from Crypto.Protocol.SecretSharing import Shamir

    return Shamir.split(threshold, n, secret)


def combine_shares(shares: list[tuple[int, bytes]]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    return Shamir.combine(shares)


def encode(values: np.ndarray) -> np.ndarray:
    """float64 -> uint64 fixed point (two's complement modulo 2^64)."""
    return np.round(values.astype(np.float64) * (1 << SCALE_BITS)).astype(np.int64).view(np.uint64)


def decode(codes: np.ndarray) -> np.ndarray:
    return codes.view(np.int64).astype(np.float64) / (1 << SCALE_BITS)
