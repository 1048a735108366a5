"""What a bundle decides with, and who vouches for it (torch-free, onnx-free).

- The thresholds baked into every exported graph's metadata must equal the manifest's
  (:func:`check_graph_thresholds`); ``edgestad run``, ``evaluate --backend onnx`` and ``export``
  refuse a graph that disagrees.
- :func:`change_thresholds` is the one legitimate way to change thresholds after training: it
  recomputes them from the validation statistics stored at training time (or sets a value),
  records who/when/old/new/rule in ``thresholds_history``, rewrites the ``thresholds`` metadata of
  every graph (their hashes with them), drops TensorRT engines built from the old graphs and
  updates the manifest's decision digest - no retraining.
- Optional fleet signing: :func:`sign_bundle` writes ``signature.json`` (Ed25519 over the
  manifest's file hashes and decision digest); :func:`verify_signature` is what
  ``edgestad run --trusted-key`` checks.
"""
from __future__ import annotations

import base64
import datetime as _dt
import getpass
import hashlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

from .bundle import (DIGEST_KEY, FORMAT_VERSION, MANIFEST_NAME, SIGNATURE_NAME, Bundle, BundleError, add_files,
                     atomic_write_bytes, canonical_json, decision_differences, load_bundle,
                     sha256_file)
from .contract import ONNX_FILES, REPORT_FILE
from .image_threshold import ImageThresholdError, normal_threshold, rank_threshold, recall_threshold
from . import graph_meta

SIGNATURE_FORMAT = "edgestad-signature/1"
PRIVATE_KEY_NAME = "edgestad-signing.key"
PUBLIC_KEY_NAME = "edgestad-signing.pub"


class ThresholdError(BundleError):
    """A threshold change that cannot be made; the message names the option."""


class GraphThresholdError(BundleError):
    """An exported graph carries thresholds that differ from the manifest's."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by another key, or changed since it was signed."""


# ------------------------------------------------------------------------------ graphs


def graph_files(manifest: Mapping) -> dict[str, str]:
    """precision -> ONNX file name of every exported graph listed in the manifest."""
    files = manifest.get("files") or {}
    listed = ((manifest.get("exports") or {}).get("onnx") or {})
    out = {p: n for p, n in listed.items() if isinstance(n, str) and n in files} if isinstance(listed, Mapping) else {}
    for precision, name in ONNX_FILES.items():
        if name in files and name not in out.values():
            out.setdefault(precision, name)
    return out


def _first_difference(baked: Any, manifest: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(baked, Mapping) and isinstance(manifest, Mapping):
        keys = [k for k in ("pixel", "image") if k in baked or k in manifest]
        keys += sorted(k for k in set(baked) | set(manifest) if k not in keys)
        for key in keys:
            found = _first_difference(baked.get(key), manifest.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if baked == manifest else (path, baked, manifest)


def graph_threshold_problem(bundle_dir: Path, manifest: Mapping, name: str) -> str | None:
    """Why the graph ``name`` may not run with this manifest (its baked thresholds differ), or
    None. Graphs without baked thresholds (not made by ``edgestad export``) cannot disagree."""
    path = Path(bundle_dir) / name
    try:
        meta = graph_meta.read_metadata(path.read_bytes())
    except FileNotFoundError:
        return None  # the bundle's file check reports missing files
    except graph_meta.GraphMetadataError as exc:
        return f"{path}: not a readable ONNX model ({exc})"
    text = meta.get("thresholds")
    if text is None:
        return None
    try:
        baked = json.loads(text)
    except ValueError:
        return f"{path}: its metadata 'thresholds' is not JSON ({text[:40]!r})"
    found = _first_difference(baked, manifest.get("thresholds"), "thresholds")
    if found is None:
        return None
    where, got, want = found
    return (f"{path}: baked {where} {_short(got)} differs from {MANIFEST_NAME} {where} {_short(want)} "
            "(the graph was exported with other thresholds; change thresholds only with "
            "`edgestad thresholds`, which rewrites every graph)")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_graph_thresholds(bundle: Bundle, names: list[str] | None = None) -> None:
    """Raise GraphThresholdError for the first graph whose baked thresholds differ."""
    for name in names if names is not None else graph_files(bundle.manifest).values():
        problem = graph_threshold_problem(bundle.path, bundle.manifest, name)
        if problem:
            raise GraphThresholdError(problem)


# ------------------------------------------------------------------------------ thresholds


def pixel_threshold_for_fpr(thresholds: Mapping, fpr: float) -> tuple[float, str]:
    """The pixel threshold at validation pixel false-positive rate ``fpr``, from the quantile
    table ``fit_thresholds`` stores (exact at its points, log-linear between them)."""
    if not 0 < fpr < 1:
        raise ThresholdError(f"--pixel-fpr: must be between 0 and 1, got {fpr}")
    table = (thresholds.get("rule") or {}).get("validation_pixel_quantiles")
    if not isinstance(table, Mapping) or not table.get("fpr"):
        raise ThresholdError("--pixel-fpr: this bundle stores no validation pixel quantiles (trained "
                             "before edgestad recorded them); set --pixel-threshold, or retrain")
    fprs, values = [float(v) for v in table["fpr"]], [float(v) for v in table["value"]]
    for f, v in zip(fprs, values):
        if math.isclose(f, fpr, rel_tol=1e-12, abs_tol=0.0):
            return v, f"quantile {1 - fpr:g} of validation good pixels (stored)"
    if not fprs[0] <= fpr <= fprs[-1]:
        raise ThresholdError(f"--pixel-fpr: {fpr:g} is outside the stored validation quantiles "
                             f"({fprs[0]:g} .. {fprs[-1]:g}, {table.get('pixels', '?')} validation pixels)")
    for (f0, v0), (f1, v1) in zip(zip(fprs, values), zip(fprs[1:], values[1:])):
        if f0 <= fpr <= f1:
            t = (math.log(fpr) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + t * (v1 - v0), (f"quantile {1 - fpr:g} of validation good pixels "
                                        f"(interpolated between the stored fpr {f0:g} and {f1:g})")
    raise ThresholdError(f"--pixel-fpr: {fpr:g} not found in the stored quantiles")  # pragma: no cover


def image_threshold_for_false_reject(thresholds: Mapping, false_reject: float,
                                     option: str = "--image-false-reject",
                                     min_k: int = 1) -> tuple[float, str, dict | None]:
    """(threshold, rule, rank result) for a false-reject target, from the validation image scores
    stored at training time, by the same rule as training (``edgestad.image_threshold``). Bundles
    trained before the scores were stored use their stored mean/std (the normal fit they were
    made with; rank result None)."""
    if not 0 <= false_reject < 0.5:
        raise ThresholdError(f"{option}: must be in [0, 0.5), got {false_reject}")
    rule = thresholds.get("rule") or {}
    scores = rule.get("validation_scores")
    if isinstance(scores, list) and scores:
        try:
            result = rank_threshold(scores, false_reject, option, min_k=min_k)
        except ImageThresholdError as exc:
            raise ThresholdError(str(exc)) from None
        return float(result["threshold"]), result["rule"], result
    try:
        if false_reject == 0:
            return float(rule["validation_score_max"]), "largest validation good image score", None
        mu, sigma = float(rule["validation_score_mean"]), float(rule["validation_score_std"])
    except (KeyError, TypeError, ValueError):
        raise ThresholdError(f"{option}: this bundle stores no validation image-score "
                             "statistics; set --image-threshold, or retrain") from None
    threshold, text = normal_threshold(mu, sigma, false_reject)
    return threshold, text, None


def defect_scores(bundle: Bundle, folder) -> list[float]:
    """Image scores of the real defective images in ``folder`` from the bundle's exported fp32
    graph (ONNX Runtime, torch-free), preprocessed by the bundle's own input rule."""
    from .contract import uses_valid_box
    from .data import DataError, list_images, load_images
    from .onnx_session import ort_session, run_session
    name = graph_files(bundle.manifest).get("fp32")
    if not name:
        raise ThresholdError(f"--defects: {bundle.path} has no exported fp32 graph to score the "
                             f"defective images with; run `edgestad export {bundle.path}` first")
    try:
        paths = list_images(folder)
    except (DataError, OSError) as exc:
        raise ThresholdError(f"--defects: {folder}: {exc}") from None
    if not paths:
        raise ThresholdError(f"--defects: {folder}: no images")
    section = bundle.manifest["input"]
    try:
        images, boxes = load_images(paths, (section["height"], section["width"]),
                                    resize=section.get("resize", "area_or_linear"), with_boxes=True)
    except DataError as exc:
        raise ThresholdError(f"--defects: {exc}") from None
    _, scores = run_session(ort_session(bundle.file(name)), images.transpose(0, 3, 1, 2),
                            boxes=boxes if uses_valid_box(section) else None)
    return [float(s) for s in scores]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in a bare container
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _set_by_hand(new: dict, rules: list, key: str, value: float, option: str, **cleared) -> None:
    """A threshold set to a value by hand: checked, recorded in the rule, the rule's derived
    fields (``cleared``) reset."""
    if not math.isfinite(value):
        raise ThresholdError(f"{option}: must be a finite number, got {value}")
    new[key] = float(value)
    new["rule"].update({key: f"set by hand (edgestad thresholds {option})", **cleared})
    rules.append(f"{option} {value:g}: set by hand")


def new_thresholds(thresholds: Mapping, *, pixel_fpr: float | None = None,
                   image_false_reject: float | None = None, pixel: float | None = None,
                   image: float | None = None, review_false_reject: float | None = None,
                   review: float | None = None, no_review: bool = False,
                   defects: list[float] | None = None, recall: float | None = None
                   ) -> tuple[dict, list[str]]:
    """(the new thresholds dict, the rule of each change). ``review*``: the REVIEW band's lower
    threshold (``no_review`` removes the band)."""
    new = json.loads(json.dumps(dict(thresholds)))
    rule = new.setdefault("rule", {})
    rules = []
    if pixel_fpr is not None:
        new["pixel"], text = pixel_threshold_for_fpr(thresholds, pixel_fpr)
        rule.update(pixel=text, pixel_fpr=pixel_fpr)
        rules.append(f"--pixel-fpr {pixel_fpr:g}: {text}")
    if pixel is not None:
        _set_by_hand(new, rules, "pixel", pixel, "--pixel-threshold", pixel_fpr=None)
    image_rank = None
    if image_false_reject is not None:
        new["image"], text, image_rank = image_threshold_for_false_reject(thresholds, image_false_reject)
        rule.update(image=text, image_false_reject=image_false_reject,
                    image_promised_false_reject=image_rank["promised"] if image_rank else None,
                    image_target_widened=bool(image_rank and image_rank["widened"]))
        rules.append(f"--image-false-reject {image_false_reject:g}: {text}")
    if image is not None:
        _set_by_hand(new, rules, "image", image, "--image-threshold", image_false_reject=None,
                     image_promised_false_reject=None, image_target_widened=False)
    if defects is not None:
        try:
            found = recall_threshold(defects, recall, rule.get("validation_scores"))
        except ImageThresholdError as exc:
            raise ThresholdError(str(exc)) from None
        new["image"] = found["threshold"]
        rule.update(image=found["rule"], image_false_reject=None,
                    image_promised_false_reject=found.get("expected_good_ng"),
                    image_target_widened=False, defects={
                        k: found[k] for k in ("defects", "caught", "recall", "validation_good_ng",
                                              "expected_good_ng") if k in found})
        rules.append(f"--defects ({len(defects)} images) --recall {recall:g}: {found['rule']}")
    if review_false_reject is not None:
        min_k = image_rank["k"] + 1 if image_rank else 1
        new["image_review"], text, _ = image_threshold_for_false_reject(
            thresholds, review_false_reject, "--review-false-reject", min_k=min_k)
        rule.update(image_review=text, review_false_reject=review_false_reject)
        rules.append(f"--review-false-reject {review_false_reject:g}: {text}")
    if review is not None:
        _set_by_hand(new, rules, "image_review", review, "--review-threshold",
                     review_false_reject=None)
    if no_review and new.get("image_review") is not None:
        # None, not a deleted key: manifest updates merge, so a key is ended by null
        new["image_review"] = None
        for key in ("image_review", "review_false_reject", "review_promised_false_reject"):
            if key in rule:
                rule[key] = None
        rules.append("--no-review: REVIEW band removed")
    if new.get("image_review") is not None and not new["image_review"] < new["image"]:
        raise ThresholdError(f"--review-threshold: the REVIEW threshold {new['image_review']:g} "
                             f"must be below the image (NG) threshold {new['image']:g}")
    return new, rules


def change_thresholds(bundle_path, *, pixel_fpr: float | None = None,
                      image_false_reject: float | None = None, pixel: float | None = None,
                      image: float | None = None, review_false_reject: float | None = None,
                      review: float | None = None, no_review: bool = False,
                      defects_dir=None, recall: float = 0.95,
                      reason: str | None = None, log: Callable[[str], None] = print,
                      by: str | None = None) -> dict:
    """Change the bundle's thresholds in place (see the module docstring); returns the history
    entry. The bundle must verify (files and decision digest) before anything is changed.
    ``by``: who (default: the user and host running this; the operator page names its lead)."""
    bundle = _directory_bundle(bundle_path, check_decisions=True)
    old = bundle.thresholds
    new, rules = new_thresholds(old, pixel_fpr=pixel_fpr, image_false_reject=image_false_reject,
                                pixel=pixel, image=image, review_false_reject=review_false_reject,
                                review=review, no_review=no_review,
                                defects=None if defects_dir is None else defect_scores(bundle, defects_dir),
                                recall=recall)

    def shown(t):
        return {k: t.get(k) for k in ("pixel", "image", "image_review")
                if k != "image_review" or t.get(k) is not None}
    entry = {"at": _now(), "by": by or _user(), "change": "thresholds", "old": shown(old),
             "new": shown(new), "rule": "; ".join(rules)}
    if reason:
        entry["reason"] = reason
    _rewrite(bundle, {"thresholds": new}, entry, log)
    return entry


def seal(bundle_path, reason: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Adopt the manifest's decision sections as they are now (new digest), recorded in
    ``thresholds_history``: for bundles written before the digest existed, or a deliberate,
    recorded acceptance of a hand edit."""
    bundle = _directory_bundle(bundle_path, check_decisions=False)
    diff = decision_differences(bundle.manifest)
    adopted = "a format version 1 bundle, written before the digest existed" if bundle.legacy else \
        "no decision_digest before" if diff is None else (
        "adopted hand edits of " + ", ".join(diff) if diff else "digest already matched")
    thr = bundle.manifest.get("thresholds") or {}
    entry = {"at": _now(), "by": _user(), "change": "seal",
             "old": {"pixel": thr.get("pixel"), "image": thr.get("image")},
             "new": {"pixel": thr.get("pixel"), "image": thr.get("image")},
             "rule": f"sealed the manifest's decision sections as they are ({adopted})"}
    if reason:
        entry["reason"] = reason
    _rewrite(bundle, {"thresholds": thr} if thr else {}, entry, log, check_decisions=False)
    log(f"{bundle.path}: decision digest written (format version {FORMAT_VERSION})")
    return entry


def _directory_bundle(bundle_path, check_decisions: bool) -> Bundle:
    bundle = load_bundle(bundle_path, check_decisions=check_decisions)
    if bundle.source.is_file():
        raise BundleError(f"bundle {bundle.source}: is an archive; thresholds are changed in a "
                          "bundle directory - unpack it, change them, pack it again")
    return bundle


def _rewrite(bundle: Bundle, updates: dict, entry: dict, log, check_decisions: bool = True) -> Bundle:
    manifest = bundle.manifest
    thresholds = updates.get("thresholds", manifest.get("thresholds"))
    graphs = graph_files(manifest)
    files: dict[str, bytes] = {}
    new_sha: dict[str, str] = {}
    old_sha = {name: manifest["files"][name] for name in graphs.values()}
    text = json.dumps(thresholds, sort_keys=True)  # as export/exporter.py bakes it
    # fp32 first: fp16/int8 record the sha256 of the fp32 graph they were derived from.
    for precision in sorted(graphs, key=lambda p: (p != "fp32", p)):
        name = graphs[precision]
        data = bundle.file(name).read_bytes()
        meta = graph_meta.read_metadata(data)
        props: dict[str, Any] = {}
        if "thresholds" in meta or meta.get("edgestad.format"):
            props["thresholds"] = text
        fp32 = graphs.get("fp32")
        if precision != "fp32" and fp32 in new_sha and meta.get("source_fp32_sha256") == old_sha.get(fp32):
            props["source_fp32_sha256"] = new_sha[fp32]
        if not props:
            continue
        rewritten = graph_meta.set_metadata(data, props)
        new_sha[name] = hashlib.sha256(rewritten).hexdigest()
        if new_sha[name] != old_sha[name]:
            files[name] = rewritten
            log(f"rewrote the thresholds in {name} (sha256 {old_sha[name][:12]} -> {new_sha[name][:12]})")
    exports = manifest.get("exports") or {}
    engines = [dict(e) for e in exports.get("engines") or [] if isinstance(e, Mapping)]
    stale = [e for e in engines if e.get("onnx") in files or e.get("onnx_sha256") in
             {old_sha[n] for n in files}]
    remove = []
    for e in stale:
        for key in ("file", "sidecar"):
            if e.get(key) and e[key] in manifest["files"]:
                remove.append(e[key])
        log(f"removed {e.get('file')}: it was built from {e.get('onnx') or 'a graph'} before the "
            f"threshold change; rebuild it with `edgestad export {bundle.path}` on the device")
    updates = dict(updates)
    history = list(manifest.get("thresholds_history") or [])
    updates["thresholds_history"] = history + [entry]
    if files or stale:
        kept = [e for e in engines if e not in stale]
        export_updates: dict[str, Any] = {"engines": kept}
        if isinstance(exports.get("onnx_sha256"), Mapping):
            export_updates["onnx_sha256"] = {p: new_sha.get(n, exports["onnx_sha256"].get(p))
                                             for p, n in graphs.items() if p in exports["onnx_sha256"]}
        updates["exports"] = export_updates
        report = _updated_report(bundle, graphs, files, new_sha, kept)
        if report is not None:
            files[REPORT_FILE] = report
    bundle = add_files(bundle.path, files, manifest_updates=updates, remove=remove,
                       check_decisions=check_decisions, seal=True)
    signature = bundle.path / SIGNATURE_NAME
    if signature.exists():
        signature.unlink()
        log(f"removed {SIGNATURE_NAME}: it signed the bundle before this change; sign it again "
            f"with `edgestad sign {bundle.path} --key KEY`")
    return bundle


def _updated_report(bundle: Bundle, graphs, files, new_sha, engines) -> bytes | None:
    if REPORT_FILE not in bundle.manifest["files"]:
        return None
    try:
        report = json.loads(bundle.file(REPORT_FILE).read_text())
    except ValueError:
        return None
    for precision, name in graphs.items():
        entry = (report.get("graphs") or {}).get(precision)
        if isinstance(entry, dict) and name in files:
            entry["sha256"] = new_sha[name]
            entry["bytes"] = len(files[name])
    report["engines"] = engines
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()


def describe(bundle: Bundle) -> str:
    """What ``edgestad thresholds --show`` prints."""
    m = bundle.manifest
    thr = m.get("thresholds") or {}
    rule = thr.get("rule") or {}
    lines = [f"bundle {bundle.path} ({m.get('method')})",
             f"  pixel threshold {thr.get('pixel')}  ({rule.get('pixel', '?')})",
             f"  image threshold {thr.get('image')}  ({rule.get('image', '?')})"]
    if thr.get("image_review") is not None:
        lines.append(f"  REVIEW above {thr['image_review']}  ({rule.get('image_review', '?')})")
    if rule.get("image_promised_false_reject") is not None:
        lines.append(f"  promised good parts NG: {rule['image_promised_false_reject']:.3g}"
                     + (" (the target was widened: the validation set supports no lower rate)"
                        if rule.get("image_target_widened") else ""))
    table = rule.get("validation_pixel_quantiles")
    if isinstance(table, Mapping) and table.get("fpr"):
        lines.append(f"  stored validation pixel quantiles: fpr {table['fpr'][0]:g} .. {table['fpr'][-1]:g} "
                     f"({len(table['fpr'])} points, {table.get('pixels', '?')} pixels) -> --pixel-fpr works")
    if "validation_score_mean" in rule:
        lines.append(f"  validation image scores: mean {rule['validation_score_mean']:.6g}, std "
                     f"{rule.get('validation_score_std', 0):.6g}, max {rule.get('validation_score_max', 0):.6g} "
                     f"({rule.get('validation_images', '?')} images) -> --image-false-reject works")
    diff = decision_differences(m)
    lines.append("  decision digest: " + (
        "none: legacy format version 1 bundle, thresholds unprotected (seal with --seal)" if bundle.legacy else
        "missing (seal with --seal)" if diff is None else
                                         "matches" if not diff else "MISMATCH: " + ", ".join(diff)))
    for name in graph_files(m).values():
        problem = graph_threshold_problem(bundle.path, m, name)
        lines.append(f"  {name}: " + ("thresholds match the manifest" if problem is None else "DIFFERS"))
    sig = bundle.path / SIGNATURE_NAME
    lines.append(f"  {SIGNATURE_NAME}: " + ("present" if sig.is_file() else "none"))
    for e in m.get("thresholds_history") or []:
        lines.append(f"  history: {e.get('at')} {e.get('by')}: {e.get('old')} -> {e.get('new')} "
                     f"({e.get('rule')})" + (f" reason: {e['reason']}" if e.get("reason") else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ signing


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


__all__ = ["GraphThresholdError", "SignatureError", "ThresholdError", "change_thresholds",
           "check_graph_thresholds", "describe", "graph_files", "graph_threshold_problem", "keygen",
           "load_private_key", "load_public_key", "seal", "sign_bundle", "signing_payload",
           "verify_signature", "sha256_file"]
