"""Fleet signing: who vouches for a bundle (Ed25519, torch-free).

:func:`sign_bundle` writes ``signature.json`` (over the manifest's file hashes and decision
digest); :func:`verify_signature` is what ``edgestad run --trusted-key`` checks; :func:`keygen`
makes a key pair. A recorded threshold change (``edgestad/bundle_thresholds.py``) removes the
signature, since it no longer covers the bundle.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from .bundle import DIGEST_KEY, SIGNATURE_NAME, Bundle, BundleError, canonical_json
from .files import atomic_write_bytes
from .bundle_thresholds import _directory_bundle, _now, _user

SIGNATURE_FORMAT = "edgestad-signature/1"
PRIVATE_KEY_NAME = "edgestad-signing.key"
PUBLIC_KEY_NAME = "edgestad-signing.pub"


class SignatureError(BundleError):
    """A bundle is unsigned, signed by another key, or changed since it was signed."""


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return serialization, ed25519


def _raw_public(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _read_key_file(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def load_private_key(path):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "--key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(f"--key {path}: password-protected keys are not supported; use an "
                             "unencrypted PEM key kept where only the signer can read it") from None
    except ValueError as exc:
        raise SignatureError(f"--key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"--key {path}: is a {type(key).__name__}, not an Ed25519 key "
                             "(make one with `edgestad keygen`)")
    return key


def load_public_key(path, what: str = "--trusted-key"):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, what)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key given by mistake still names its public half
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except Exception:  # noqa: BLE001
            raise SignatureError(f"{what} {path}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{what} {path}: not an Ed25519 public key (make one with `edgestad keygen`)")
    return key


def signing_payload(manifest: Mapping) -> dict:
    digest = manifest.get(DIGEST_KEY)
    return {"format": SIGNATURE_FORMAT, "files": dict(manifest["files"]),
            "decision_digest": digest.get("sha256") if isinstance(digest, Mapping) else None}


def sign_bundle(bundle_path, key_path) -> Path:
    """Verify the bundle, then write ``signature.json`` beside its manifest."""
    key = load_private_key(key_path)
    bundle = _directory_bundle(bundle_path, check_decisions=True)
    if bundle.legacy:
        raise SignatureError(f"bundle {bundle.path}: has no decision digest (format version 1), so a "
                             "signature could not cover its thresholds; check them, seal them with "
                             f"`edgestad thresholds {bundle.path} --seal`, then sign")
    payload = signing_payload(bundle.manifest)
    signature = key.sign(canonical_json(payload))
    serialization, _ = _crypto()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    doc = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
           "public_key": public_pem.decode(), "signed_at": _now(), "signed_by": _user(),
           "signed": "canonical JSON of payload (file sha256s + decision digest)",
           "payload": payload, "signature": base64.b64encode(signature).decode()}
    path = bundle.path / SIGNATURE_NAME
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return path


def verify_signature(bundle: Bundle, trusted_key_path) -> str:
    """Raise SignatureError unless ``signature.json`` was made with the trusted key over exactly
    this bundle's file hashes and decision digest (the bundle itself must already have been
    loaded with verification, which ties those to the files and the manifest). Returns the key id."""
    from cryptography.exceptions import InvalidSignature

    trusted = load_public_key(trusted_key_path)
    path = bundle.path / SIGNATURE_NAME
    where = f"bundle {bundle.source}"
    if not path.is_file():
        raise SignatureError(f"{where}: unsigned (no {SIGNATURE_NAME}) but --trusted-key requires a "
                             f"bundle signed with key {key_id(trusted)} (`edgestad sign`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        payload, signature = doc["payload"], base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise SignatureError(f"{where}: {SIGNATURE_NAME} is malformed") from None
    if doc.get("key_id") != key_id(trusted):
        raise SignatureError(f"{where}: signed with key {doc.get('key_id')}, not the trusted key "
                             f"{key_id(trusted)}")
    try:
        trusted.verify(signature, canonical_json(payload))
    except InvalidSignature:
        raise SignatureError(f"{where}: {SIGNATURE_NAME} does not verify with the trusted key "
                             f"{key_id(trusted)} (the signature file was altered)") from None
    current = signing_payload(bundle.manifest)
    if not current["decision_digest"] or payload.get("decision_digest") != current["decision_digest"]:
        raise SignatureError(f"{where}: thresholds/decision sections changed since the bundle was "
                             "signed; sign it again")
    signed_files, files = payload.get("files") or {}, current["files"]
    changed = sorted(n for n in set(signed_files) | set(files) if signed_files.get(n) != files.get(n))
    if changed:
        raise SignatureError(f"{where}: file {changed[0]} " + (
            "is not covered by the signature" if changed[0] not in signed_files else
            "was removed since signing" if changed[0] not in files else "changed since signing")
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "") + "; sign it again")
    return key_id(trusted)


def keygen(out_dir) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair (private key 0600) into ``out_dir``; never overwrites."""
    serialization, ed25519 = _crypto()
    out = Path(out_dir)
    private, public = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for path in (private, public):
        if path.exists():
            raise SignatureError(f"--out {out}: {path.name} already exists; refusing to overwrite a key")
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
