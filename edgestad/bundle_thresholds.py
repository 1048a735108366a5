"""A bundle's thresholds after training: checked in every graph, changed only on the record
(torch-free, onnx-free).

- The thresholds baked into every exported graph's metadata must equal the manifest's
  (:func:`check_graph_thresholds`); ``edgestad run``, ``evaluate --backend onnx`` and ``export``
  refuse a graph that disagrees.
- :func:`change_thresholds` is the one legitimate way to change thresholds after training: it
  recomputes them by the training rules (``edgestad/thresholds.py``) from the validation
  statistics stored at training time (or sets a value), records who/when/old/new/rule in
  ``thresholds_history``, rewrites the ``thresholds`` metadata of every graph (their hashes with
  them), drops TensorRT engines built from the old graphs and updates the manifest's decision
  digest - no retraining. :func:`seal` adopts the decision sections as they are, on the record.
- :func:`describe` is what ``edgestad thresholds --show`` prints.

Signing (who vouches for the bundle) is ``edgestad/signing.py``.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

from .bundle import (FORMAT_VERSION, MANIFEST_NAME, SIGNATURE_NAME, Bundle, BundleError, add_files,
                     decision_differences, load_bundle)
from .contract import ONNX_FILES, REPORT_FILE
from .thresholds import PROMISE_CONFIDENCE, ThresholdError, new_thresholds
from . import graph_meta


class GraphThresholdError(BundleError):
    """An exported graph carries thresholds that differ from the manifest's."""


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


def defect_scores(bundle: Bundle, folder) -> list[float]:
    """Image scores of the real defective images in ``folder`` from the bundle's exported fp32
    graph (ONNX Runtime, torch-free), preprocessed by the bundle's own input rule."""
    from .contract import uses_valid_box
    from .images import DataError, list_images
    from .datasets import load_images
    from .runner import run_graph
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
    _, scores = run_graph(bundle.file(name), images.transpose(0, 3, 1, 2),
                          boxes if uses_valid_box(section) else None)
    return [float(s) for s in scores]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in a bare container
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


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
        bound = rule.get("image_promise_bound")
        lines.append(f"  promised good parts NG: {rule['image_promised_false_reject']:.3g}"
                     + (f" (below {bound:.3g} with {100 * PROMISE_CONFIDENCE:.0f} % confidence)"
                        if bound is not None else "")
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
