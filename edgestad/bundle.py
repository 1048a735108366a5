"""Model bundles: the one artefact that travels from training to the line-side device.

A bundle is a directory holding ``manifest.json``, ``weights.safetensors`` and, after export,
ONNX models, TensorRT engines and reports. ``manifest["files"]`` records the sha256 of every file
except the manifest itself, so a loader can prove it runs exactly what was trained, with the thresholds that were recorded.
A bundle may also be shipped as a single ``.tar`` / ``.tar.gz`` / ``.zip`` made by
:func:`pack_bundle`; :func:`load_bundle` accepts either form.

This module must stay importable without torch: the camera runtime uses it on devices that have
no torch. Weights are therefore stored and returned as numpy arrays (``safetensors.numpy``); the
torch side converts with ``torch.from_numpy``. Nothing here ever unpickles a file.

Public API: ``FORMAT``, ``FORMAT_VERSION``, ``BundleError``, ``Bundle``, ``write_bundle``,
``add_files``, ``load_bundle``, ``pack_bundle``, ``default_bundle_path``. Writing files safely
(atomic replace, fsync, hashing) is ``edgestad/files.py``.
"""

from __future__ import annotations

import copy
import glob
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import numpy as np

from .files import (CHUNK, FileSource, JsonWriteError, atomic_write_json, fsync_dir, json_bytes, json_default,
                    replacing, sha256_file, temp_name, unlink_quietly, write_new_file)

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 fallback
    import tomli as tomllib  # type: ignore[no-redef]

FORMAT = "edgestad-bundle"
# 2: the manifest carries ``decision_digest`` (required). Version-1 bundles (written before it
# existed) still load, as "legacy" with a warning, until `edgestad thresholds --seal` upgrades them.
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
REQUIRED_KEYS = ("format", "format_version", "method", "method_config", "input", "files")
# Keys the bundle code owns; callers of add_files must not overwrite them via manifest_updates.
_MANAGED_KEYS = ("format", "format_version", "files", "decision_digest")
# The manifest's decision-relevant content: what turns a map into OK/NG. ``decision_digest``
# holds a sha256 per section (and per sub-key of dict sections) over canonical JSON, written by
# write_bundle/add_files and checked by load_bundle, so a hand edit of e.g. thresholds.image is
# reported by name instead of silently changing decisions. Change thresholds with
# ``edgestad thresholds`` (it records the change in ``thresholds_history``).
DECISION_KEYS = ("thresholds", "score_stats", "input", "method", "method_config", "image_score",
                 "thresholds_history")
DIGEST_KEY = "decision_digest"
SIGNATURE_NAME = "signature.json"
ENV_BUNDLE = "EDGESTAD_BUNDLE"
CONFIG_NAME = "edgestad.toml"

log = logging.getLogger("edgestad.bundle")

# A safetensors file starts with an 8-byte little-endian header length followed by a JSON
# header. Real headers are kilobytes; the cap only stops a corrupt length from allocating GBs.
_MAX_SAFETENSORS_HEADER = 100 << 20


class BundleError(Exception):
    """A bundle is missing, malformed, tampered with, or cannot be written.

    Messages always name the bundle path and the file concerned, and say what is wrong.
    """


class DecisionDigestError(BundleError):
    """The manifest's decision-relevant content differs from its ``decision_digest``.

    ``sections`` names what differs (e.g. ``["thresholds.image"]``); empty when the digest is
    missing altogether."""

    def __init__(self, message: str, sections: list[str] | None = None):
        super().__init__(message)
        self.sections = list(sections or [])


# ----------------------------------------------------------------------------------------------
# Bundle object and loading
# ----------------------------------------------------------------------------------------------


class Bundle:
    """A loaded (and, unless ``verify=False``, verified) bundle directory.

    ``path`` is the bundle directory (for archives: the extracted copy), ``source`` what the
    caller passed (the directory or the archive), ``manifest`` the parsed manifest.json.
    """

    def __init__(self, path: Path, manifest: dict, *, verify: bool = True, source: Path | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.verify = verify
        self.source = Path(source) if source is not None else self.path
        self._weights: dict[str, np.ndarray] | None = None
        # A format-version-1 bundle without a decision digest (see FORMAT_VERSION).
        self.legacy = is_legacy(manifest)
        # name -> (size, mtime_ns) of the file state whose hash was checked, so file() does not
        # re-hash large engines on every call but still notices a file replaced after loading.
        self._verified: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, method={self.manifest.get('method')!r})"

    @property
    def files(self) -> dict[str, str]:
        """``{file name: sha256}`` as recorded in the manifest."""
        return dict(self.manifest["files"])

    def file(self, name: str) -> Path:
        """Path of a file listed in the manifest, checked against its recorded sha256."""
        listed = self.manifest["files"]
        if name not in listed:
            raise BundleError(
                f"bundle {self.path}: file {name!r} is not listed in {MANIFEST_NAME} "
                f"(listed: {', '.join(sorted(listed)) or 'none'})"
            )
        file_path = self.path / name
        if self.verify:
            self._verify_file(name)
        elif not file_path.is_file():
            raise BundleError(f"bundle {self.path}: file {name} is listed in {MANIFEST_NAME} but missing")
        return file_path

    def weights(self) -> dict[str, np.ndarray]:
        """The state dict as numpy arrays (read once, then cached).

        The bytes that are hashed are the bytes that are parsed, so a file swapped after
        load_bundle() cannot slip through. Never unpickles: non-safetensors data is rejected.
        """
        if self._weights is None:
            file_path = self.path / WEIGHTS_NAME
            try:
                data = file_path.read_bytes()
            except FileNotFoundError:
                raise BundleError(f"bundle {self.path}: file {WEIGHTS_NAME} is missing") from None
            if self.verify:
                _check_hash(self.path, WEIGHTS_NAME, self.manifest["files"].get(WEIGHTS_NAME),
                            hashlib.sha256(data).hexdigest())
            _check_safetensors_header(self.path, WEIGHTS_NAME, data[:8], len(data),
                                      lambda n: data[8:8 + n])
            self._weights = _load_safetensors_bytes(self.path, data)
        return self._weights

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input ``(height, width)`` from ``manifest["input"]``."""
        inp = self.manifest["input"]
        try:
            return int(inp["height"]), int(inp["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.path}: {MANIFEST_NAME} 'input' needs integer 'height' and 'width' "
                f"(got {inp!r})"
            ) from exc

    @property
    def reading(self) -> dict:
        """How this bundle reads an image, from ``manifest["input"]``: its input size, resize
        rule and region of interest, as the keyword arguments of ``edgestad.datasets``'
        ``load_images`` and ``load_test_set`` (training, evaluation, calibration and the studies
        all read images this way)."""
        inp = self.manifest["input"]
        return {"size": self.input_size, "resize": inp.get("resize", "area_or_linear"),
                "roi": inp.get("roi")}

    @property
    def thresholds(self) -> dict:
        """``manifest["thresholds"]`` (``pixel``, ``image``, ``rule``).

        Raises BundleError when the bundle has no thresholds (it was not trained to the end), rather than letting
        the runtime run with no decision threshold.
        """
        thr = self.manifest.get("thresholds")
        if not isinstance(thr, dict) or not thr:
            raise BundleError(
                f"bundle {self.path}: {MANIFEST_NAME} has no 'thresholds' "
                "(its training did not set them)"
            )
        return thr

    def _verify_file(self, name: str) -> None:
        file_path = self.path / name
        try:
            st = file_path.stat()
        except FileNotFoundError:
            raise BundleError(
                f"bundle {self.path}: file {name} is listed in {MANIFEST_NAME} but missing"
            ) from None
        state = (st.st_size, st.st_mtime_ns)
        if self._verified.get(name) == state:
            return
        _check_hash(self.path, name, self.manifest["files"][name], sha256_file(file_path))
        self._verified[name] = state


def load_bundle(path: str | os.PathLike[str], verify: bool = True,
                check_decisions: bool = True) -> Bundle:
    """Load a bundle directory or a bundle archive (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``).

    Always checks the manifest structure: format, format_version (newer than this code ->
    error), required keys, plain file names, and that weights.safetensors is listed.
    With ``verify=True`` (default) also checks that every listed file exists, that its sha256
    matches, and that weights.safetensors really is a safetensors file. ``verify=False`` skips
    the per-file checks, e.g. to inspect the manifest of a damaged bundle. The decision-relevant
    sections (``DECISION_KEYS``: thresholds, score_stats, input, method, ...) must match the
    manifest's ``decision_digest`` (DecisionDigestError names the section that changed);
    ``check_decisions=False`` skips only that check (``edgestad thresholds --seal`` uses it).

    Archives are extracted safely (no absolute paths, no '..', no links) into a cache directory
    beside the archive (``.<archive name>.<sha>.edgestad-extract``), or under the system temp
    directory when the archive's directory is not writable.
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"bundle {source}: not found (expected a bundle directory or archive)")
    if source.is_file():
        bundle_dir = _extract_archive(source)
    else:
        bundle_dir = source
    manifest = _read_manifest(bundle_dir)
    bundle = Bundle(bundle_dir, manifest, verify=verify, source=source)
    if verify and check_decisions:
        verify_decision_digest(manifest, bundle_dir)
        if bundle.legacy:
            log.warning("bundle %s: format version 1 without a decision digest: its thresholds and "
                        "score statistics are not protected; check them and seal them with "
                        "`edgestad thresholds %s --seal`", source, source)
    if verify:
        for name in manifest["files"]:
            bundle._verify_file(name)
        weights_path = bundle_dir / WEIGHTS_NAME
        with open(weights_path, "rb") as fh:
            head = fh.read(8)

            def read_header(n: int) -> bytes:
                return fh.read(n)

            _check_safetensors_header(bundle_dir, WEIGHTS_NAME, head, weights_path.stat().st_size,
                                      read_header)
    return bundle


# ----------------------------------------------------------------------------------------------
# Decision digest
# ----------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes digests and signatures are computed over: keys sorted, no
    whitespace, UTF-8, no NaN (numpy values converted as in the manifest)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=json_default).encode("utf-8")


def _sha(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def decision_sections(manifest: Mapping) -> dict[str, str]:
    """sha256 per decision section present in ``manifest``, and per sub-key of dict sections
    (``thresholds.image``), so a mismatch can be reported by name."""
    sections: dict[str, str] = {}
    for key in DECISION_KEYS:
        if key not in manifest:
            continue
        value = manifest[key]
        sections[key] = _sha(value)
        if isinstance(value, Mapping):
            for sub, item in value.items():
                sections[f"{key}.{sub}"] = _sha(item)
    return sections


def decision_digest(manifest: Mapping) -> dict:
    """The ``decision_digest`` entry for ``manifest`` (written by write_bundle / add_files)."""
    sections = decision_sections(manifest)
    return {"algorithm": "sha256", "canonical": "JSON, keys sorted, no whitespace, UTF-8",
            "covers": [k for k in DECISION_KEYS if k in manifest], "sections": sections,
            "sha256": _sha(sections)}


def decision_differences(manifest: Mapping) -> list[str] | None:
    """Names of the decision sections that differ from the stored digest (most specific first:
    ``thresholds.image`` rather than ``thresholds``); [] when they all match; None when the
    manifest has no usable digest."""
    stored = manifest.get(DIGEST_KEY)
    if not isinstance(stored, Mapping) or not isinstance(stored.get("sections"), Mapping):
        return None
    expected = dict(stored["sections"])
    actual = decision_sections(manifest)
    names = sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))
    if not names and stored.get("sha256") != _sha(expected):
        return [DIGEST_KEY]
    specific = [n for n in names if not any(o.startswith(n + ".") for o in names)]
    return specific


def is_legacy(manifest: Mapping) -> bool:
    """A bundle written before the decision digest existed (format version 1, no digest)."""
    return manifest.get("format_version") == LEGACY_FORMAT_VERSION and DIGEST_KEY not in manifest


def verify_decision_digest(manifest: Mapping, bundle_dir: Path) -> None:
    """Raise DecisionDigestError unless the manifest's decision sections match its digest
    (legacy version-1 bundles without one pass; ``Bundle.legacy`` says so)."""
    where = f"bundle {bundle_dir}: file {MANIFEST_NAME}"
    if is_legacy(manifest):
        return
    diff = decision_differences(manifest)
    if diff is None:
        raise DecisionDigestError(
            f"{where} has no valid {DIGEST_KEY} (format version {manifest.get('format_version')} "
            "requires one: it was removed), so its thresholds and score statistics cannot be "
            "shown to be the ones training or `edgestad thresholds` recorded; "
            f"check them with `edgestad thresholds {bundle_dir} --show`, then seal them with "
            f"`edgestad thresholds {bundle_dir} --seal`")
    if diff:
        verb = "differs" if len(diff) == 1 else "differ"
        raise DecisionDigestError(
            f"{where}: {', '.join(diff)} {verb} from what training or `edgestad thresholds` recorded ({DIGEST_KEY} "
            "mismatch: the manifest was edited by hand); change thresholds with `edgestad "
            "thresholds`, or retrain", diff)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_bundle(
    path: str | os.PathLike[str],
    manifest: dict,
    weights: Mapping[str, np.ndarray],
    extra_files: Mapping[str, FileSource] | None = None,
) -> Path:
    """Write a complete bundle directory at ``path`` atomically and return its path.

    ``manifest`` must hold at least ``method``, ``method_config`` and ``input``; it is copied,
    not modified. The written manifest also gets ``format``, ``format_version``, ``created``
    (UTC ISO-8601), ``code_version`` and ``files`` (sha256 of every file but manifest.json).
    ``weights`` are numpy arrays (convert torch tensors with ``.detach().cpu().numpy()``).
    ``extra_files`` maps plain file names to bytes or a path to copy.

    Everything is built in a temp directory beside ``path`` and fsynced, then swapped in: an
    existing bundle is renamed aside, the new one renamed into place, and the old one removed.
    If anything fails before the swap, the temp directory is removed and the old bundle is left
    untouched. An existing ``path`` must be a bundle directory (or empty); anything else is
    refused rather than deleted.
    """
    target = Path(os.path.abspath(path))  # with_name() below needs a real last component
    manifest = copy.deepcopy(dict(manifest))
    missing = [k for k in ("method", "method_config", "input") if k not in manifest]
    if missing:
        raise BundleError(f"bundle {target}: manifest is missing required keys {missing}")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        _check_plain_name(target, name)
        if name in (MANIFEST_NAME, WEIGHTS_NAME):
            raise BundleError(f"bundle {target}: extra file {name!r} would overwrite the bundle's own {name}")
    weights_bytes = _serialize_weights(target, weights)
    _check_replaceable(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temp_name(target)
    os.mkdir(tmp_dir, 0o777)  # umask applies; mkdtemp's 0700 would hide the bundle from services
    try:
        files = {WEIGHTS_NAME: write_new_file(tmp_dir / WEIGHTS_NAME, weights_bytes)}
        for name in sorted(extra_files):
            files[name] = write_new_file(tmp_dir / name, extra_files[name])
        manifest["files"] = files
        manifest["format"] = FORMAT
        manifest["format_version"] = FORMAT_VERSION
        manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest["code_version"] = _code_version()
        manifest[DIGEST_KEY] = decision_digest(manifest)
        write_new_file(tmp_dir / MANIFEST_NAME, _manifest_bytes(manifest, tmp_dir / MANIFEST_NAME))
        fsync_dir(tmp_dir)
        _swap_in(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return target


def add_files(
    path: str | os.PathLike[str],
    files: Mapping[str, FileSource],
    manifest_updates: dict | None = None,
    remove: Iterable[str] = (),
    check_decisions: bool = True,
    seal: bool = False,
    replace: Iterable[str] = (),
) -> Bundle:
    """Add or replace files in an existing bundle directory and update its manifest.

    Used by export (model.onnx, engines, reports). Each file is written to a temp name in the
    bundle, fsynced and ``os.replace``\\ d into place; then manifest.json is rewritten atomically
    with the new hashes, ``manifest_updates`` deep-merged in (nested dicts merge, other values
    replace; top-level sections named in ``replace`` are replaced whole), and the ``remove``\\ d
    names dropped; only then are removed files deleted. A crash
    before the manifest rewrite can leave a replaced file whose hash no longer matches: the
    loader then reports a sha256 mismatch for that file instead of silently running it.
    The manifest on disk must match its ``decision_digest`` (else DecisionDigestError, nothing
    written; ``check_decisions=False`` only for ``edgestad thresholds --seal``); the digest is
    recomputed after ``manifest_updates`` are merged, so changes made through here are legitimate.
    A legacy (version-1, digest-less) bundle stays so unless ``seal`` (``edgestad thresholds``),
    which writes the current format version and a digest.
    Returns the bundle loaded without re-hashing the untouched files.
    """
    bundle_dir = Path(path)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir}: not a bundle directory (add_files cannot modify archives)")
    manifest = _read_manifest(bundle_dir)
    if check_decisions:
        # Never re-digest a manifest someone edited by hand: that would launder the edit.
        verify_decision_digest(manifest, bundle_dir)
    files = dict(files)
    remove = list(remove)
    for name in list(files) + remove:
        _check_plain_name(bundle_dir, name)
        if name == MANIFEST_NAME:
            raise BundleError(f"bundle {bundle_dir}: {MANIFEST_NAME} is managed by the bundle code; "
                              "pass changes as manifest_updates")
    both = sorted(set(files) & set(remove))
    if both:
        raise BundleError(f"bundle {bundle_dir}: files {both} are both added and removed")
    if WEIGHTS_NAME in remove:
        raise BundleError(f"bundle {bundle_dir}: {WEIGHTS_NAME} cannot be removed")
    updates = copy.deepcopy(dict(manifest_updates or {}))
    managed = [k for k in _MANAGED_KEYS if k in updates]
    if managed:
        raise BundleError(f"bundle {bundle_dir}: manifest_updates may not set {managed}; "
                          "these are maintained by edgestad.bundle")
    if WEIGHTS_NAME in files:
        data = _source_bytes_head(files[WEIGHTS_NAME])
        _check_safetensors_header(bundle_dir, WEIGHTS_NAME, data[0][:8], data[1],
                                  lambda n: data[0][8:8 + n])

    hashes: dict[str, str] = {}
    for name in sorted(files):
        dst = bundle_dir / name
        with replacing(dst, sync_dir=False) as tmp:
            hashes[name] = write_new_file(tmp, files[name])
    fsync_dir(bundle_dir)

    for key in replace:
        manifest.pop(key, None)
    _deep_merge(manifest, updates)
    for name in remove:
        manifest["files"].pop(name, None)
    manifest["files"].update(hashes)
    if seal or not is_legacy(manifest):
        manifest["format_version"] = max(int(manifest["format_version"]), FORMAT_VERSION)
        manifest[DIGEST_KEY] = decision_digest(manifest)
    atomic_write_json(bundle_dir / MANIFEST_NAME, manifest)

    for name in remove:
        unlink_quietly(bundle_dir / name)
    if remove:
        fsync_dir(bundle_dir)
    bundle = Bundle(bundle_dir, manifest)
    return bundle


def record_exports(path: str | os.PathLike[str], files: Mapping[str, FileSource], exports: dict,
                   remove: Iterable[str] = ()) -> Bundle:
    """Add export's files (graphs, report, engines) and make ``exports`` the manifest's whole
    ``exports`` section, so graphs and engines it no longer lists drop out of it."""
    return add_files(path, files, {"exports": exports}, remove, replace=("exports",))


# ----------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------


def pack_bundle(bundle_dir: str | os.PathLike[str], archive_path: str | os.PathLike[str]) -> Path:
    """Pack a verified bundle into one archive; the format follows the suffix of ``archive_path``
    (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``). Files sit at the archive's top level; only
    manifest.json and the files it lists are included (no stray temp files). Written atomically.
    """
    bundle = load_bundle(bundle_dir, verify=True)
    archive = Path(archive_path)
    kind = _archive_kind(archive)
    if kind is None:
        raise BundleError(f"archive {archive}: unsupported suffix; use .zip, .tar, .tar.gz or .tgz")
    names = [MANIFEST_NAME] + sorted(bundle.manifest["files"])
    if (bundle.path / SIGNATURE_NAME).is_file():  # not listed: it signs the manifest's hashes
        names.append(SIGNATURE_NAME)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with replacing(archive) as tmp:
        if kind == "zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in names:
                    zf.write(bundle.path / name, arcname=name)
        else:
            mode = "w:gz" if kind == "tar.gz" else "w"
            with tarfile.open(tmp, mode) as tf:
                for name in names:
                    info = tf.gettarinfo(str(bundle.path / name), arcname=name)
                    # Owner names/ids of the build machine mean nothing on the device.
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    with open(bundle.path / name, "rb") as fh:
                        tf.addfile(info, fh)
    return archive


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".tar.gz") or name.endswith(".tgz"):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    return None


def _extract_archive(archive: Path) -> Path:
    """Extract ``archive`` once into a cache dir keyed by its sha256 and return the bundle dir."""
    if zipfile.is_zipfile(archive):
        kind = "zip"
    elif tarfile.is_tarfile(archive):
        kind = "tar"
    else:
        raise BundleError(f"bundle {archive}: is a file but not a .tar, .tar.gz or .zip bundle archive")
    digest = sha256_file(archive)[:16]
    cache_name = f".{archive.name}.{digest}.edgestad-extract"
    for root in (archive.parent, Path(tempfile.gettempdir()) / "edgestad-bundles"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(root / archive.name)
            os.mkdir(tmp, 0o777)
        except OSError:  # read-only or foreign directory: fall back to the temp dir
            continue
        cache = root / cache_name
        try:
            if cache.is_dir() and _bundle_root(cache) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return _bundle_root(cache)  # type: ignore[return-value]
            _safe_extract(archive, kind, tmp)
            if _bundle_root(tmp) is None:
                raise BundleError(f"bundle {archive}: archive contains no {MANIFEST_NAME}")
            shutil.rmtree(cache, ignore_errors=True)  # an incomplete cache from a crashed run
            try:
                os.rename(tmp, cache)
            except OSError:
                # Another process extracted the same archive meanwhile; use its copy.
                if not cache.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(root)
        # Drop caches of earlier versions of this archive.
        for stale in root.glob(f".{glob.escape(archive.name)}.*.edgestad-extract"):
            if stale.name != cache_name:
                shutil.rmtree(stale, ignore_errors=True)
        return _bundle_root(cache)  # type: ignore[return-value]
    raise BundleError(f"bundle {archive}: no writable directory to extract the archive into")


def _bundle_root(directory: Path) -> Path | None:
    """The directory holding manifest.json: the extraction dir itself or its single subdir
    (for archives made with ``tar czf b.tar.gz bundle/``)."""
    if (directory / MANIFEST_NAME).is_file():
        return directory
    entries = [p for p in directory.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_NAME).is_file():
        return entries[0]
    return None


def _safe_member_path(archive: Path, name: str) -> PurePosixPath:
    """Reject absolute paths, '..' components and Windows drive/backslash tricks."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle {archive}: unsafe archive member {name!r} (absolute path)")
    rel = PurePosixPath(name)
    if ".." in rel.parts:
        raise BundleError(f"bundle {archive}: unsafe archive member {name!r} (contains '..')")
    return rel


def _safe_extract(archive: Path, kind: str, dest: Path) -> None:
    """Extract regular files only, writing them ourselves so no member can create links,
    devices, setuid bits or paths outside ``dest``."""
    def write(rel: PurePosixPath, src) -> None:
        if not rel.parts or rel.parts == (".",):
            return
        out = dest.joinpath(*rel.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(src, fh, CHUNK)
            fh.flush()
            os.fsync(fh.fileno())

    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:  # validate everything before writing anything
                _safe_member_path(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BundleError(f"bundle {archive}: archive member {info.filename!r} is a link")
            for info in infos:
                if info.is_dir():
                    continue
                with zf.open(info) as src:
                    write(_safe_member_path(archive, info.filename), src)
    else:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for m in members:
                _safe_member_path(archive, m.name)
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"bundle {archive}: archive member {m.name!r} is not a regular "
                                      "file (links and devices are not allowed in bundles)")
            for m in members:
                if m.isdir():
                    continue
                src = tf.extractfile(m)
                assert src is not None  # regular file
                with src:
                    write(_safe_member_path(archive, m.name), src)


# ----------------------------------------------------------------------------------------------
# Config lookup
# ----------------------------------------------------------------------------------------------


def default_bundle_path() -> Path:
    """Bundle to use when a CLI command's BUNDLE argument is omitted.

    1. env ``EDGESTAD_BUNDLE`` if set and non-empty;
    2. else ``bundle = "..."`` (top-level key) in ``edgestad.toml`` in the current directory,
       resolved relative to that file;
    3. else BundleError explaining both options.
    """
    env = os.environ.get(ENV_BUNDLE, "").strip()
    if env:
        return Path(env).expanduser()
    config = Path.cwd() / CONFIG_NAME
    if config.is_file():
        try:
            with open(config, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise BundleError(f"{config}: invalid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise BundleError(f"{config}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start}); save it as UTF-8") from None
        value = data.get("bundle")
        if value is None:
            raise BundleError(
                f"{config} has no top-level 'bundle' key; add e.g. bundle = \"runs/bottle/bundle\" "
                f"or set {ENV_BUNDLE}, or pass the BUNDLE argument"
            )
        if not isinstance(value, str) or not value.strip():
            raise BundleError(f"{config}: 'bundle' must be a non-empty string path, got {value!r}")
        return (config.parent / Path(value).expanduser())
    raise BundleError(
        f"no bundle given: pass the BUNDLE argument, set the environment variable {ENV_BUNDLE}, "
        f"or put bundle = \"path/to/bundle\" in {CONFIG_NAME} in the current directory ({Path.cwd()})"
    )


# ----------------------------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------------------------


def _code_version() -> str:
    import edgestad

    version = getattr(edgestad, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("edgestad")
    except Exception:  # not installed as a distribution (e.g. vendored copy)
        return "0.1.0"


def _manifest_bytes(manifest: Any, where: Path) -> bytes:
    try:
        return json_bytes(manifest, where)
    except JsonWriteError as exc:
        raise BundleError(str(exc)) from exc


def _check_plain_name(bundle: Path, name: Any) -> None:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\x00" in name or name.startswith(".")):
        raise BundleError(
            f"bundle {bundle}: invalid file name {name!r}; bundle files must be plain names "
            "(no path separators, no '..', not hidden)"
        )


def _check_replaceable(target: Path) -> None:
    """Only ever replace something that is a bundle (or an empty dir): never delete user data."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise BundleError(f"bundle {target}: exists and is not a directory; refusing to replace it")
    if (target / MANIFEST_NAME).is_file() or not any(target.iterdir()):
        return
    raise BundleError(
        f"bundle {target}: directory exists but has no {MANIFEST_NAME}; refusing to replace "
        "something that is not a bundle"
    )


def _swap_in(tmp_dir: Path, target: Path) -> None:
    """Move the finished ``tmp_dir`` to ``target``, replacing an existing bundle.

    POSIX cannot rename a directory over a non-empty one, so the old bundle is renamed aside
    first and restored if the second rename fails.
    """
    parent = target.parent
    if not target.exists():
        os.rename(tmp_dir, target)
        fsync_dir(parent)
        return
    old = temp_name(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp_dir, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _serialize_weights(bundle: Path, weights: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise BundleError(f"bundle {bundle}: weight name {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise BundleError(
                f"bundle {bundle}: weight {key!r} is a {type(value).__module__}.{type(value).__name__}, "
                "not a numpy array (convert torch tensors with .detach().cpu().numpy())"
            )
        # Not np.ascontiguousarray: it turns 0-d arrays (e.g. num_batches_tracked) into shape (1,).
        arrays[key] = value if value.flags.c_contiguous else value.copy(order="C")
    try:
        return save(arrays, metadata={"format": FORMAT})
    except Exception as exc:  # SafetensorError (e.g. unsupported dtype) is not exported nicely
        raise BundleError(f"bundle {bundle}: cannot serialise weights to {WEIGHTS_NAME}: {exc}") from exc


def _load_safetensors_bytes(bundle: Path, data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return dict(load(data))
    except Exception as exc:
        raise BundleError(f"bundle {bundle}: file {WEIGHTS_NAME} is not a valid safetensors file: {exc}") from exc


def _source_bytes_head(src: FileSource) -> tuple[bytes, int]:
    """(first bytes incl. the safetensors header, total size) of bytes or a file."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return data, len(data)
    size = os.path.getsize(src)
    with open(src, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return head + fh.read(min(n, _MAX_SAFETENSORS_HEADER)), size


def _check_safetensors_header(bundle: Path, name: str, head: bytes, size: int, read_header) -> None:
    """Reject anything that is not safetensors, with a hint for the usual mistake (torch.save).

    Parsing is left to safetensors, which never executes code; this check exists to give a
    clear message instead of "header too large".
    """
    where = f"bundle {bundle}: file {name}"
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    header = None
    if 2 <= n <= _MAX_SAFETENSORS_HEADER and 8 + n <= size:
        try:
            header = json.loads(read_header(n))
        except (ValueError, UnicodeDecodeError):
            header = None
    if isinstance(header, dict):
        return
    # Not safetensors. Name the usual mistakes (torch.save output) only now: a valid safetensors
    # header length can itself start with the pickle opcode byte 0x80 (e.g. 0x1080 bytes).
    if head[:1] == b"\x80":
        raise BundleError(f"{where} is a Python pickle (e.g. torch.save output), not safetensors; "
                          "edgestad never unpickles files - save the weights with safetensors")
    if head[:4] == b"PK\x03\x04":
        raise BundleError(f"{where} is a zip archive (torch.save output?), not safetensors; "
                          "edgestad never unpickles files - save the weights with safetensors")
    if len(head) < 8:
        raise BundleError(f"{where} is not a safetensors file (only {size} bytes)")
    if n < 2 or n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise BundleError(f"{where} is not a safetensors file (header length {n} does not fit "
                          f"the file size {size})")
    raise BundleError(f"{where} is not a safetensors file (header is not a JSON object)")


def _check_hash(bundle: Path, name: str, expected: str | None, actual: str) -> None:
    if expected != actual:
        raise BundleError(
            f"bundle {bundle}: sha256 mismatch for file {name}: manifest expects "
            f"{str(expected)[:12]}..., file has {actual[:12]}... (modified or corrupted after the "
            "bundle was written)"
        )


def _read_manifest(bundle_dir: Path) -> dict:
    """Parse manifest.json and check everything that does not need the other files."""
    mpath = bundle_dir / MANIFEST_NAME
    where = f"bundle {bundle_dir}: file {MANIFEST_NAME}"
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{where} is missing (not a bundle directory?)") from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{where}: unknown format {fmt!r} (expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{where}: invalid format_version {version!r} (expected an integer >= 1)")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: format_version {version} is newer than this edgestad supports "
            f"({FORMAT_VERSION}); upgrade edgestad to load this bundle"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: missing required keys {missing}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{where}: 'files' must be an object of name -> sha256")
    for name, digest in files.items():
        _check_plain_name(bundle_dir, name)
        if name == MANIFEST_NAME:
            raise BundleError(f"{where}: 'files' must not list {MANIFEST_NAME} itself")
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise BundleError(f"{where}: 'files' entry for {name} is not a sha256 hex digest: {digest!r}")
    if WEIGHTS_NAME not in files:
        raise BundleError(f"{where}: 'files' does not list {WEIGHTS_NAME}")
    if not isinstance(manifest["input"], dict):
        raise BundleError(f"{where}: 'input' must be an object")
    return manifest


def _deep_merge(base: dict, updates: Mapping) -> dict:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
