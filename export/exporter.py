"""``export_bundle``: bundle in, ONNX graphs (+ report, + TensorRT engines) added to the bundle.

Steps, each a function below, each of which must succeed before anything is written:

1. ``_open``: load and verify the bundle (BundleError names the bad file, or the decision section
   that was edited by hand) and the thresholds baked into its graphs (they must equal the manifest's);
2. ``_reuse_graphs``: per precision, reuse the bundle's existing graph when it was made from the
   same weights, thresholds, opset and code version (so a Jetson without torch can build engines
   from a bundle exported on the workstation); ``_load_references``: the torch model and parity
   images; ``_make_fp32`` from the torch model, ``_make_reduced``: fp16 and int8 from the fp32
   graph (export/precision.py);
3. ``_check_graphs``: every graph's I/O contract and TensorRT compatibility (export/trt_compat.py);
4. ``_measure``: parity against the torch model and the fp32 graph on good training images,
   accuracy cost on the test set (export/parity.py); the fp32 graph must match torch to 1e-4;
5. ``_write_graphs``: one ``record_exports`` call writes the graphs, ``export_report.json`` and the
   manifest's whole ``exports`` section; stale engines of replaced graphs are removed in the same call;
6. ``_add_engines``: where TensorRT and a GPU exist, build, verify and add one engine per
   requested precision.

Everything is held in memory until step 5, so a failure leaves the bundle exactly as it was.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from edgestad.bundle import WEIGHTS_NAME, Bundle, load_bundle, record_exports
from edgestad.contract import VALID_BOX_NAME, uses_valid_box

from .onnx_export import DEFAULT_INT8_FP16_STRIDE, INT8_FEEDS_KEY, INT8_FP16_KEY
from .graph import (DEFAULT_OPSET, INPUT_NAME, MAP_NAME, METADATA_FORMAT, ONNX_FILES, PRECISIONS,
                    REPORT_FILE, SCORE_NAME, check_io_contract, default_opset, op_counts,
                    read_metadata, set_metadata, sha256_bytes)

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """Export cannot proceed; the message says what and how to fix it. The bundle is unchanged."""


@dataclass
class ExportOptions:
    precisions: Sequence[str] = ("fp32", "fp16", "int8")
    opset: int = DEFAULT_OPSET
    batch: int = 1                    # TensorRT profile: the batch the engine is tuned for
    max_batch: int = 8                # TensorRT profile: the largest batch the engine accepts
    calibration_images: int = 32
    calibration_method: str = "minmax"
    calibration_data: Path | None = None   # default: the bundle's provenance.data
    parity_images: int = 8
    accuracy: bool = True             # AU-PRO etc. on the test set (needs an MVTec-layout folder)
    engine: bool | None = None        # None: build where TensorRT + GPU exist
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    force: bool = False               # re-export even when the bundle's graphs are current
    threads: int | None = None        # ONNX Runtime intra-op threads for parity runs
    batch_size: int = 4               # images per ONNX Runtime / torch call in parity runs
    form: str = "default"             # a deploy form of the method (e.g. uninformed_students' "fused")
    int8_fp16_stride: int = DEFAULT_INT8_FP16_STRIDE  # int8: backbone layers at strides <= this stay fp16 (0: none)


@dataclass
class ExportResult:
    bundle: Path
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    engines: list[dict] = field(default_factory=list)
    engine_note: str | None = None
    report: dict = field(default_factory=dict)


def normalize_precisions(values: Iterable[str]) -> tuple[str, ...]:
    """Expand 'all', drop duplicates, keep the canonical order; ValueError on unknown names."""
    wanted: set[str] = set()
    for value in values:
        for item in str(value).lower().replace(",", " ").split():
            if item == "all":
                wanted.update(PRECISIONS)
            elif item in PRECISIONS:
                wanted.add(item)
            else:
                raise ValueError(f"unknown precision {item!r}; use fp32, fp16, int8 or all")
    if not wanted:
        wanted.update(PRECISIONS)
    return tuple(p for p in PRECISIONS if p in wanted)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import edgestad
    versions = {"edgestad": edgestad.__version__, "onnx": onnx.__version__}
    for module in ("onnxruntime", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    return versions


def _thresholds_text(manifest: dict) -> str:
    return json.dumps(manifest.get("thresholds"), sort_keys=True)


def _graph_metadata(bundle: Bundle, precision: str, opset: int, extra: dict) -> dict:
    import edgestad
    manifest = bundle.manifest
    height, width = bundle.input_size
    inp = manifest.get("input", {})
    return {
        "edgestad.format": METADATA_FORMAT,
        "method": manifest["method"],
        "backbone": (manifest.get("backbone") or {}).get("name", ""),
        "precision": precision,
        "opset": str(opset),
        "input_size": [height, width],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "color": inp.get("color", "RGB"),
                  "shape": ["batch", 3, height, width], "value_range": [0, 255],
                  "resize": inp.get("resize", "area_or_linear")},
        "outputs": {MAP_NAME: ["batch", 1, height, width], SCORE_NAME: ["batch"],
                    "dtype": "float32", "image_score": manifest.get("image_score", "max")},
        "valid_box": uses_valid_box(inp),
        "thresholds": _thresholds_text(manifest),
        "weights_sha256": manifest["files"][WEIGHTS_NAME],
        "producer": "edgestad",
        "producer_version": edgestad.__version__,
        **extra,
    }


def _form(options: ExportOptions) -> str:
    return options.form


def _reusable(meta: dict, precision: str, bundle: Bundle, options: ExportOptions,
              fp32_sha: str | None) -> str | None:
    """None when a stored graph can be reused, else why not."""
    manifest = bundle.manifest
    import edgestad
    checks = [
        (meta.get("edgestad.format") == METADATA_FORMAT, "unknown graph format"),
        (meta.get("precision") == precision, "precision differs"),
        (meta.get("weights_sha256") == manifest["files"][WEIGHTS_NAME], "weights changed"),
        (meta.get("thresholds") == _thresholds_text(manifest), "thresholds changed"),
        (meta.get("opset") == str(options.opset), f"opset {meta.get('opset')} != {options.opset}"),
        (meta.get("producer_version") == edgestad.__version__, "made by another edgestad version"),
    ]
    if precision == "fp32":
        form = _form(options)
        stored = meta.get("network_form", "default")
        stored = "default" if stored == "separate" else stored
        checks.append((stored == form, f"network form {stored} != {form}"))
        checks.append((INT8_FP16_KEY in meta, "made before the int8 first-stages record"))
        from edgestad.methods import get_method
        method = get_method(manifest["method"])
        feeds = method.int8_fp16_feeds(method.config_cls.from_dict(manifest["method_config"]))
        checks.append((INT8_FEEDS_KEY in meta or not feeds, "made before the int8 global-branch record"))
    if precision != "fp32":
        checks.append((meta.get("source_fp32_sha256") == fp32_sha, "fp32 graph changed"))
    if precision == "int8":
        calib = json.loads(meta.get("calibration", "{}") or "{}")
        checks.append((calib.get("images") == options.calibration_images
                       and calib.get("method") == options.calibration_method, "calibration settings differ"))
        checks.append((calib.get("fp16_stride", 0) == options.int8_fp16_stride, "--int8-fp16-stride differs"))
        checks.append((calib.get("fp16_feeds", False), "made before the global branch's feeds ran fp16"))
    for ok, why in checks:
        if not ok:
            return why
    return None


@dataclass
class _Work:
    """What one export carries from step to step; nothing is written before ``_write_graphs``."""
    bundle: Bundle
    options: ExportOptions
    log: Log
    precisions: tuple[str, ...]
    result: ExportResult
    graphs: dict[str, bytes] = field(default_factory=dict)         # precision -> ONNX bytes
    models: dict[str, onnx.ModelProto] = field(default_factory=dict)  # the graphs made this time
    details: dict[str, dict] = field(default_factory=dict)        # precision -> how it was made
    torch_model: object = None
    parity_images: np.ndarray | None = None
    parity_boxes: np.ndarray | None = None
    parity_note: str | None = None
    compat: dict = field(default_factory=dict)
    parity: dict | None = None
    accuracy: dict | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The requested precisions, fp32 first: it is the source of the others."""
        return ("fp32",) + tuple(p for p in self.precisions if p != "fp32")

    @property
    def new(self) -> list[str]:
        return [p for p in self.targets if p not in self.result.reused]


def export_bundle(bundle_path, options: ExportOptions | None = None, log: Log = print) -> ExportResult:
    work = _open(bundle_path, options or ExportOptions(), log)
    _reuse_graphs(work)
    _load_references(work)
    _make_fp32(work)
    _make_reduced(work)
    _check_graphs(work)
    _measure(work)
    _write_graphs(work)
    _add_engines(work)
    if work.parity_note and not work.new:
        log(f"note: {work.parity_note}")
    return work.result


def _open(bundle_path, options: ExportOptions, log: Log) -> _Work:
    """1. the bundle, verified (files, decision digest, thresholds baked into its graphs)."""
    precisions = normalize_precisions(options.precisions)
    if not 1 <= options.batch <= options.max_batch:
        raise ExportError(f"--batch {options.batch} must be between 1 and --max-batch {options.max_batch}")
    bundle = load_bundle(bundle_path)  # files and the decision digest: a hand-edited manifest stops here
    # Graphs whose baked thresholds differ from the manifest are refused, not silently re-exported:
    # thresholds change only through `edgestad thresholds`, which keeps both in step.
    from edgestad.bundle_thresholds import check_graph_thresholds
    check_graph_thresholds(bundle)
    if bundle.source.is_file():
        raise ExportError(f"bundle {bundle.source} is an archive; export adds files to a bundle directory "
                          "- unpack it first")
    return _Work(bundle, options, log, precisions, ExportResult(bundle=bundle.path))


def _reuse_graphs(work: _Work) -> None:
    """2a. the bundle's graphs made from the same weights, thresholds and settings are kept."""
    manifest = work.bundle.manifest
    existing = (manifest.get("exports") or {}).get("onnx") or {}
    for precision in work.targets:
        name = existing.get(precision)
        if work.options.force or not name or name not in manifest["files"]:
            continue
        data = work.bundle.file(name).read_bytes()
        fp32_sha = sha256_bytes(work.graphs["fp32"]) if "fp32" in work.graphs else None
        why_not = _reusable(read_metadata(onnx.load_from_string(data)), precision, work.bundle,
                            work.options, fp32_sha)
        if why_not is None:
            work.graphs[precision] = data
            work.result.reused.append(precision)
            work.log(f"reusing {name} ({precision}): made from these weights with the same settings "
                     "(--force re-exports)")
        else:
            work.log(f"re-exporting {precision}: the bundle's {name} is stale ({why_not})")


def _load_references(work: _Work) -> None:
    """2b. the torch model (the parity reference whenever a graph is made) and parity images."""
    from . import calibration as cal
    if work.new:
        try:
            from edgestad.methods import load_model
            work.torch_model = load_model(work.bundle)
        except ImportError as exc:
            if "fp32" in work.new:
                raise ExportError(f"exporting the fp32 graph needs torch ({exc}); install edgestad[train], "
                                  "or export on the training machine and copy the bundle") from exc
            work.log(f"torch is not installed ({exc}): new graphs are compared with the fp32 graph only")
    try:
        work.parity_images, work.parity_boxes = cal.calibration_images(
            work.bundle, work.options.parity_images, work.options.calibration_data)
    except cal.CalibrationError as exc:
        if work.new:
            raise ExportError(f"cannot check parity of the new graphs: {exc}") from exc
        work.parity_note = str(exc)


def _make_fp32(work: _Work) -> None:
    """2c. the fp32 graph from the torch model (or the method's deploy form of it)."""
    bundle, options, manifest = work.bundle, work.options, work.bundle.manifest
    if "fp32" in work.new:
        from edgestad.methods import get_method

        from .onnx_export import export_fp32
        method = get_method(manifest["method"])
        graph_source = work.torch_model
        if options.form != "default":
            # An alternative form of the same model (e.g. Uninformed Students' fused ensemble);
            # parity below still compares with the bundle's own torch model.
            forms = method.deploy_forms()
            if options.form not in forms:
                raise ExportError(f"--form {options.form}: method {manifest['method']} has no such "
                                  f"deploy form (it has: {', '.join(['default', *forms])})")
            graph_source = forms[options.form](work.torch_model)
        backbone = (manifest.get("backbone") or {}).get("name")
        work.log(f"exporting fp32 graph (opset {options.opset}, {manifest['method']}"
                 + (f", backbone {backbone}" if backbone else "")
                 + f", {_form(options)} form) from the torch model ...")
        config = method.config_cls.from_dict(manifest["method_config"])
        model = export_fp32(graph_source, bundle.input_size, options.opset,
                            valid_box=uses_valid_box(manifest["input"]),
                            fp32_modules=method.fp32_modules(config),
                            int8_fp16_feeds=method.int8_fp16_feeds(config))
        work.details["fp32"] = {"rule": "float32 everywhere (reference graph)",
                                "network_form": _form(options)}
        set_metadata(model, _graph_metadata(bundle, "fp32", options.opset,
                                            {"precision_rule": work.details["fp32"]["rule"],
                                             "network_form": _form(options),
                                             "torch_version": _versions()["torch"] or ""}))
        work.models["fp32"] = model
        work.graphs["fp32"] = model.SerializeToString()


def _make_reduced(work: _Work) -> None:
    """2d. fp16 and int8 graphs from the fp32 graph (export/precision.py)."""
    from . import calibration as cal
    from .precision import to_fp16, to_int8

    options, models, details = work.options, work.models, work.details
    fp32_model = models.get("fp32") or onnx.load_from_string(work.graphs["fp32"])
    if "fp16" in work.new:
        work.log("converting to fp16 (convolution networks fp16, scoring tail fp32) ...")
        models["fp16"], details["fp16"] = to_fp16(fp32_model)
    if "int8" in work.new:
        try:
            images, _ = cal.calibration_images(work.bundle, options.calibration_images,
                                               options.calibration_data)
        except cal.CalibrationError as exc:
            raise ExportError(f"int8 needs calibration images: {exc}") from exc
        work.log(f"quantizing to int8 (Q/DQ, {options.calibration_method} calibration on "
                 f"{len(images)} good training images) ...")
        models["int8"], details["int8"] = to_int8(fp32_model, images, options.calibration_method,
                                                  fp16_stride=options.int8_fp16_stride)
        details["int8"]["calibration_data"] = str(cal.data_folder(work.bundle, options.calibration_data))
    for precision in ("fp16", "int8"):
        if precision in models:
            extra = {"precision_rule": details[precision]["rule"],
                     "source_fp32_sha256": sha256_bytes(work.graphs["fp32"])}
            if precision == "int8":
                extra["calibration"] = {"images": options.calibration_images,
                                        "method": options.calibration_method,
                                        "fp16_stride": options.int8_fp16_stride,
                                        "fp16_feeds": True}
            set_metadata(models[precision], _graph_metadata(work.bundle, precision,
                                                            default_opset(fp32_model), extra))
            work.graphs[precision] = models[precision].SerializeToString()


def _check_graphs(work: _Work) -> None:
    """3. every graph, new or reused: the I/O contract and TensorRT compatibility."""
    from .trt_compat import assert_tensorrt_compatible
    for precision in work.targets:
        model = work.models.get(precision) or onnx.load_from_string(work.graphs[precision])
        what = f"{ONNX_FILES[precision]} ({precision})"
        check_io_contract(model, work.bundle.input_size, uses_valid_box(work.bundle.manifest["input"]))
        work.compat[precision] = summary = assert_tensorrt_compatible(model, what).summary()
        work.log(f"  {what}: TensorRT-compatible ({summary['checked_nodes']} nodes, opset "
                 f"{summary['opset']})")


def _measure(work: _Work) -> None:
    """4. parity (vs torch and the fp32 graph) and accuracy cost (test set) of the new graphs."""
    from . import calibration as cal
    from .parity import accuracy_cost, graph_parity
    if not work.new:
        return
    options, log = work.options, work.log
    measured = {p: work.graphs[p] for p in work.targets if p in work.new or p == "fp32"}  # fp32: the reference
    log(f"parity on {len(work.parity_images)} good training images (ONNX Runtime CPU"
        + (" vs torch" if work.torch_model is not None else "") + ") ...")
    work.parity = graph_parity(measured, work.parity_images, work.torch_model, options.batch_size,
                               options.threads, log)
    if options.accuracy:
        test = cal.test_set(work.bundle, options.calibration_data)
        if test is None:
            log("  no test/ folder in the data: accuracy cost not measured")
        else:
            log(f"accuracy cost on {len(test[0])} test images ...")
            images, masks, labels, boxes = test
            work.accuracy = accuracy_cost(measured, images, masks, labels, batch_size=options.batch_size,
                                          threads=options.threads, log=log, boxes=boxes,
                                          thresholds=work.bundle.manifest.get("thresholds"))


def _write_graphs(work: _Work) -> None:
    """5. graphs, export_report.json and the manifest's exports in one write; graphs derived from a
    replaced fp32 graph and engines built from replaced graphs are removed in the same write."""
    manifest, log, result = work.bundle.manifest, work.log, work.result
    existing = (manifest.get("exports") or {}).get("onnx") or {}
    report = _merge_report(_read_report(work.bundle), work.bundle, work.targets, work.new, work.graphs,
                           work.details, work.compat, work.parity, work.accuracy, work.options)
    # Graphs derived from a replaced fp32 graph (fp16/int8 not requested this time) no longer
    # match it; drop them rather than leave a bundle whose graphs disagree with each other.
    orphans = [p for p in existing if "fp32" in work.new and p not in work.targets and p in ONNX_FILES]
    remove = [ONNX_FILES[p] for p in orphans if ONNX_FILES[p] in manifest["files"]]
    for p in orphans:
        report["graphs"].pop(p, None)
        log(f"removing {ONNX_FILES[p]}: it was derived from the previous fp32 graph "
            f"(re-create it with --precision {p})")
    engines_before = _engine_entries(manifest)
    stale = [e for e in engines_before if e.get("precision") in orphans or (
        e.get("precision") in work.new and e.get("onnx_sha256") != sha256_bytes(work.graphs[e["precision"]]))]
    for entry in stale:
        for key in ("file", "sidecar"):
            if entry.get(key) and entry[key] in manifest["files"]:
                remove.append(entry[key])
    report["engines"] = [e for e in engines_before if e not in stale]
    files = {ONNX_FILES[p]: work.graphs[p] for p in work.new}
    files[REPORT_FILE] = _json_bytes(report)
    exports = _exports_section(work, report["engines"], orphans)
    work.bundle = record_exports(work.bundle.path, files, exports, remove=remove)
    result.written = sorted(files)
    result.removed = remove
    for name in remove:
        if name.endswith((".engine", ".json")):
            log(f"removed {name}: its engine was built from a graph that was just replaced")
    result.report = report


def _add_engines(work: _Work) -> None:
    """6. where TensorRT and a GPU exist: build, verify and add one engine per precision."""
    result = work.result
    result.engine_note, built = _maybe_build_engines(work)
    if not built:
        return
    report = result.report
    engines = [e for e in report["engines"] if e.get("file") not in {b["file"] for b in built}] + built
    report["engines"] = engines
    files = {}
    for entry in built:
        files[entry["file"]] = entry.pop("_plan")
        files[entry["sidecar"]] = entry.pop("_sidecar")
    files[REPORT_FILE] = _json_bytes(report)
    work.bundle = record_exports(work.bundle.path, files,
                                 {**work.bundle.manifest["exports"], "engines": engines})
    result.written += sorted(files)
    result.engines = built


# ------------------------------------------------------------------------------ report / manifest


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n").encode()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _read_report(bundle: Bundle) -> dict:
    if REPORT_FILE not in bundle.manifest["files"]:
        return {}
    try:
        return json.loads(bundle.file(REPORT_FILE).read_text())
    except ValueError:
        return {}


def _merge_report(old: dict, bundle: Bundle, targets, new, graphs, details, compat, parity, accuracy,
                  options: ExportOptions) -> dict:
    report = {
        "format": "edgestad-export-report/1",
        "updated": _now(),
        "bundle_weights_sha256": bundle.manifest["files"][WEIGHTS_NAME],
        "versions": _versions(),
        "parity_definition": "max|a - b| / max|b| over all pixels of all images (b = reference)",
        "graphs": dict(old.get("graphs") or {}) if old.get("bundle_weights_sha256") ==
        bundle.manifest["files"][WEIGHTS_NAME] else {},
        "parity": parity if parity is not None else old.get("parity"),
        "accuracy": accuracy if accuracy is not None else (old.get("accuracy") if parity is None else None),
        "verified_here": "ONNX Runtime CPUExecutionProvider (parity, accuracy); TensorRT engines only "
                         "where listed under engines",
    }
    for precision in targets:
        model_bytes = graphs[precision]
        entry = dict(report["graphs"].get(precision) or {}) if precision not in new else {}
        entry.update({
            "file": ONNX_FILES[precision],
            "sha256": sha256_bytes(model_bytes),
            "bytes": len(model_bytes),
            "trt_compat": compat[precision],
        })
        if precision in new:
            model = onnx.load_from_string(model_bytes)
            entry.update({"exported_at": report["updated"], "opset": default_opset(model),
                          "op_counts": op_counts(model), "precision": details.get(precision, {})})
        if parity is not None and precision in parity["graphs"]:
            entry["parity"] = parity["graphs"][precision]
        if accuracy is not None and precision in accuracy["graphs"]:
            entry["accuracy"] = accuracy["graphs"][precision]
        report["graphs"][precision] = entry
    return report


def _engine_entries(manifest: dict) -> list[dict]:
    entries = (manifest.get("exports") or {}).get("engines") or []
    return [dict(e) for e in entries if isinstance(e, dict) and e.get("file")]


def _exports_section(work: _Work, engines: list[dict], orphans: Sequence[str]) -> dict:
    """The manifest's whole ``exports`` section after this export: this run's graphs, the earlier
    ones still valid (not derived from a replaced fp32 graph), their rules, and ``engines``."""
    height, width = work.bundle.input_size
    old = dict(work.bundle.manifest.get("exports") or {})

    def kept(key: str) -> dict:
        return {p: v for p, v in (old.get(key) or {}).items() if p not in orphans}
    section = {
        **old,
        "onnx": {**kept("onnx"), **{p: ONNX_FILES[p] for p in work.targets}},
        "onnx_sha256": {**kept("onnx_sha256"), **{p: sha256_bytes(work.graphs[p]) for p in work.targets}},
        "opset": work.options.opset,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "color": "RGB",
                  "shape": ["batch", 3, height, width], "value_range": [0, 255]},
        "valid_box": ({"name": VALID_BOX_NAME, "dtype": "float32", "shape": ["batch", 4],
                       "meaning": "top, left, bottom, right of the image on the letterbox canvas"}
                      if uses_valid_box(work.bundle.manifest["input"]) else None),
        "outputs": {MAP_NAME: {"dtype": "float32", "shape": ["batch", 1, height, width]},
                    SCORE_NAME: {"dtype": "float32", "shape": ["batch"]}},
        "report": REPORT_FILE,
        "engines": engines,
        "exported_at": _now(),
    }
    rules = {**kept("precision_rules"),
             **{p: d["rule"] for p, d in work.details.items() if "rule" in d}}
    section.pop("precision_rules", None)
    if rules:
        section["precision_rules"] = rules
    return section


# ------------------------------------------------------------------------------ engines


def _maybe_build_engines(work: _Work) -> tuple[str | None, list[dict]]:
    """(why no engine was built, or None; the verified engines with their plans and sidecars)."""
    from . import tensorrt_build as trtb

    bundle, options, log = work.bundle, work.options, work.log
    if options.engine is False:
        return "engine build skipped (--no-engine)", []
    available, why = trtb.tensorrt_status()
    if not available:
        note = (f"{why}: wrote the ONNX graphs only. TensorRT engines are specific to one GPU and "
                "TensorRT version, so build them on the target device: copy the bundle there and run "
                f"`edgestad export {bundle.path} --precision {' --precision '.join(work.precisions)}` "
                "(on a Jetson, JetPack provides TensorRT; the graphs above are reused, torch is not needed).")
        log(note)
        return note, []
    gpu = trtb.gpu_info()
    cache = options.timing_cache or trtb.default_timing_cache(gpu)
    height, width = bundle.input_size
    images, boxes = work.parity_images, work.parity_boxes
    if images is None:
        # No data folder on the device: verify engine against ONNX Runtime on fixed synthetic images.
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (4, 3, height, width), dtype=np.uint8)
        source = "synthetic (data folder not available here)"
    else:
        source = "good training images"
    built = []
    for precision in work.precisions:
        onnx_bytes = work.graphs[precision]
        name = trtb.engine_file_name(precision, gpu["gpu_name"], gpu["compute_capability"],
                                     gpu["tensorrt_version"])
        engine = trtb.build_engine(onnx_bytes, precision, (3, height, width), batch=options.batch,
                                   max_batch=options.max_batch, workspace_mb=options.workspace_mb,
                                   timing_cache=cache, log=log)
        check = trtb.verify_engine(engine.plan, onnx_bytes, precision, images, options.threads,
                                   boxes, name)
        check["images_source"] = source
        if not check["passed"]:
            raise trtb.EngineBuildError(
                f"{name}: engine output differs from ONNX Runtime by {check['max_rel_diff_map']:.2e} "
                f"(max rel diff of maps; tolerance {check['tolerance']:.0e}); not written")
        log(f"  {name}: verified against ONNX Runtime, max rel diff {check['max_rel_diff_map']:.2e}")
        sidecar = trtb.make_sidecar(precision=precision, gpu=gpu, onnx_file=ONNX_FILES[precision],
                                    onnx_sha256=sha256_bytes(onnx_bytes), input_shape=(3, height, width),
                                    batch=options.batch, max_batch=options.max_batch,
                                    workspace_mb=options.workspace_mb,
                                    strongly_typed=engine.strongly_typed, verification=check)
        entry = {"file": name, "sidecar": trtb.sidecar_file_name(name), **{
            k: sidecar[k] for k in ("precision", "gpu_name", "compute_capability", "tensorrt_version",
                                    "onnx", "onnx_sha256", "built_at")},
            "verification_passed": True, "_plan": engine.plan, "_sidecar": trtb.sidecar_json(sidecar)}
        built.append(entry)
    return None, built
