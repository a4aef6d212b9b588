"""The authority's Ed25519 signing key: read from a PEM file, or generated beside the store once."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.warrants import jwk_of, public_key_id
from proxy.keys import KeyError_

log = logging.getLogger("vienna.authority")
GENERATED_KEY_FILE = "signing-key.pem"


@dataclass(frozen=True, slots=True)
class SigningKey:
    private: Ed25519PrivateKey
    kid: str

    @property
    def jwk(self) -> dict[str, str]:
        return jwk_of(self.private.public_key(), self.kid)


def load_signing_key(path: Path | None, generated_dir: Path) -> SigningKey:
    if path is None:
        path = generated_dir / GENERATED_KEY_FILE
        if not path.exists():
            generated_dir.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, pem)
            finally:
                os.close(fd)
            log.warning(
                "no --signing-key-file given: generated an Ed25519 key at %s (replicas must share one: "
                "give each the same file)",
                path,
            )
        else:
            log.warning("no --signing-key-file given: using the generated key at %s", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path}: an Ed25519 key is needed (openssl genpkey -algorithm ed25519)")
    return SigningKey(private=key, kid=public_key_id(key.public_key()))
