"""Who built an engine dir. The manifest's sha256s prove the files are the ones it lists
(integrity), not who wrote it: anyone who can write the dir can write a matching manifest. An
Ed25519 signature of the manifest (`omni build-engine --sign-key`) lets `omni serve --trust-key`
refuse engine dirs its operator did not build; the manifest then vouches for every file's hash.
Needs `cryptography` (pip install 'omni-trt[sign]')."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from ..errors import EngineDirError, UsageError
from .layout import manifest_path

SIGNATURE = "manifest.json.sig"  # base64 Ed25519 signature of manifest.json's bytes


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ModuleNotFoundError:
        raise UsageError("signing engine dirs needs cryptography: pip install 'omni-trt[sign]'", "--sign-key") from None
    return serialization


def _key(path: str | Path, private: bool) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    serialization = _crypto()
    flag = "--sign-key" if private else "--trust-key"
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}", flag) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag} {path} is not a PEM {'private' if private else 'public'} key ({e})", flag) from None
    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, kind):
        raise UsageError(f"{flag} {path} is not an Ed25519 key (openssl genpkey -algorithm ed25519)", flag)
    return key


def signing_key(path: str | Path) -> Any:
    """The PEM Ed25519 private key at `path` (read before a build, so a bad key fails first)."""
    return _key(path, private=True)


def sign_engine_dir(engine_dir: str | Path, key: Any) -> Path:
    """Write the signature of the engine dir's manifest with `key` (signing_key)."""
    out = Path(engine_dir) / SIGNATURE
    out.write_text(base64.b64encode(key.sign(manifest_path(engine_dir).read_bytes())).decode() + "\n")
    return out


def check_signature(engine_dir: str | Path, trusted: list[str]) -> str:
    """The trusted key (a PEM Ed25519 public key's path) that signed this engine dir's manifest;
    EngineDirError when none did, or it is unsigned. Symlinks are not followed."""
    from cryptography.exceptions import InvalidSignature

    keys = [(p, _key(p, private=False)) for p in trusted]
    sig_path, manifest = Path(engine_dir) / SIGNATURE, manifest_path(engine_dir)
    for p in (manifest, sig_path):
        if p.is_symlink() or not p.is_file():
            raise EngineDirError(f"{engine_dir} is not signed ({p.name} missing or a symlink): sign it with "
                                 "`omni build-engine ... --sign-key KEY`, or serve without --trust-key")
    try:
        signature = base64.b64decode(sig_path.read_text().strip(), validate=True)
    except ValueError:
        raise EngineDirError(f"{sig_path} is not a base64 signature") from None
    data = manifest.read_bytes()
    for path, key in keys:
        try:
            key.verify(signature, data)
            return path
        except InvalidSignature:
            continue
    raise EngineDirError(f"{engine_dir}'s manifest is not signed by a trusted key ({', '.join(trusted)}): refusing to serve it")
