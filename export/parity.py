"""Parity and accuracy cost of exported graphs, measured with ONNX Runtime on the CPU.

Parity: the largest relative difference of anomaly maps,

    max_rel_diff(a, b) = max |a - b| / max |b|     (b: the reference; over all pixels of all images)

i.e. the worst pixel error as a fraction of the map's dynamic range. The fp32 graph must match
the torch model to 1e-4 (FP32_PARITY_TARGET); fp16 and int8 graphs are reported, not gated.

Accuracy cost: AU-PRO (FPR limit 0.3), pixel AUROC and image AUROC of each graph on the
dataset's test set, and the change against the fp32 graph (INT8_AU_PRO_TARGET: 0.01).

ONNX Runtime's CPU provider runs fp16 nodes with fp16 tensors between nodes but may compute a
node in fp32 internally, and its int8 path is exact integer arithmetic with float rescaling:
close to, not identical with, TensorRT's kernels. The engine build therefore re-checks each
engine against ONNX Runtime on the device (tensorrt_build.verify_engine).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from edgestad.runner import OrtRunner

FP32_PARITY_TARGET = 1e-4
INT8_AU_PRO_TARGET = 0.01
# A reduced-precision graph should decide OK/REVIEW/NG as the fp32 graph does on at least this share
# of the test images. Measured: fp16 ≥ 99.4 % on bottle/screw/magnetic_tile; int8 97.6 % / 72.5 % /
# 97.9 % (the int8 map and global scores sit higher than fp32's on good parts, +0.2 on screw, so the
# fp32-calibrated image threshold rejects more good parts).
SAME_DECISION_TARGET = 0.99
# An image run alone and inside a batch: a batch-dimension bug mixes images (differences of order
# 1); what remains for a correct graph is kernel-choice rounding per batch size. Measured: fp32
# and fp16 graphs of every method ≤ 3e-7 on bottle; rstpm's int8 graph on magnetic_tile 2.0e-4
# (one int8 step flipping near a rounding boundary). The bounds leave room for other CPUs' kernels
# while staying far below a real batch bug.
BATCH_CONSISTENCY_TARGETS = {"fp32": 1e-5, "fp16": 1e-3, "int8": 5e-3}
PARITY_DEFINITION = "max|a - b| / max|b| over all pixels of all images (b = reference)"


class ParityError(ValueError):
    """A graph disagrees with its reference beyond the target, or produced non-finite values."""


def max_relative_difference(actual: np.ndarray, reference: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs reference {reference.shape}")
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    worst = float(np.max(np.abs(actual - reference))) if reference.size else 0.0
    return worst / scale if scale > 0 else worst


def compare(maps: np.ndarray, scores: np.ndarray, ref_maps: np.ndarray, ref_scores: np.ndarray) -> dict:
    return {
        "max_rel_diff_map": max_relative_difference(maps, ref_maps),
        "max_abs_diff_map": float(np.max(np.abs(maps.astype(np.float64) - ref_maps))),
        "mean_abs_diff_map": float(np.mean(np.abs(maps.astype(np.float64) - ref_maps))),
        "max_rel_diff_score": max_relative_difference(scores, ref_scores),
        "reference_map_max_abs": float(np.max(np.abs(ref_maps))),
    }


def _check_finite(what: str, maps: np.ndarray, scores: np.ndarray) -> None:
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        raise ParityError(f"{what} produced non-finite values (NaN/inf) on the parity images")


# ------------------------------------------------------------------------------ parity


def graph_parity(graphs: dict[str, bytes], images: np.ndarray, torch_model=None,
                 batch_size: int = 4, threads: int | None = None,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Parity of every graph against the torch model (if given) and against the fp32 graph.

    Also checks the dynamic batch: image 0 run alone must equal image 0 run in a batch.
    Raises ParityError when the fp32 graph misses FP32_PARITY_TARGET or any graph is non-finite.
    """
    result: dict[str, Any] = {"images": int(len(images)), "definition": PARITY_DEFINITION,
                              "fp32_target": FP32_PARITY_TARGET, "graphs": {}}
    reference = None
    if torch_model is not None:
        from edgestad.torch_loop import run_model
        t0 = time.perf_counter()
        reference = run_model(torch_model, images, batch_size=batch_size)
        result["torch_seconds"] = round(time.perf_counter() - t0, 3)
    outputs = {}
    for precision in ("fp32", "fp16", "int8"):
        if precision not in graphs:
            continue
        with OrtRunner(graphs[precision], threads=threads, batch_size=batch_size) as runner:
            t0 = time.perf_counter()
            maps, scores = runner.infer(images)
            seconds = time.perf_counter() - t0
            _check_finite(f"the {precision} graph", maps, scores)
            single_map, _ = runner.infer(images[:1])
        entry: dict[str, Any] = {
            "seconds": round(seconds, 3),
            "batch_consistency_rel_diff": max_relative_difference(single_map, maps[:1]),
        }
        if entry["batch_consistency_rel_diff"] > BATCH_CONSISTENCY_TARGETS.get(precision, 1e-5):
            raise ParityError(f"the {precision} graph gives different maps for an image run alone and in a "
                              f"batch (max rel diff {entry['batch_consistency_rel_diff']:.2e}): the batch "
                              "dimension is not handled correctly")
        if reference is not None:
            entry["vs_torch"] = compare(maps, scores, *reference)
        if precision != "fp32" and "fp32" in outputs:
            entry["vs_fp32_graph"] = compare(maps, scores, *outputs["fp32"])
        outputs[precision] = (maps, scores)
        result["graphs"][precision] = entry
        rel = entry.get("vs_torch", entry.get("vs_fp32_graph", {})).get("max_rel_diff_map")
        log(f"  parity {precision}: " + (f"max rel diff {rel:.2e}" if rel is not None else "no reference")
            + f" ({len(images)} images, {seconds:.1f} s)")
    fp32 = result["graphs"].get("fp32", {}).get("vs_torch")
    if fp32 is not None:
        fp32["target"] = FP32_PARITY_TARGET
        fp32["passed"] = fp32["max_rel_diff_map"] <= FP32_PARITY_TARGET
        if not fp32["passed"]:
            raise ParityError(f"the fp32 graph differs from the torch model by {fp32['max_rel_diff_map']:.2e} "
                              f"(max rel diff of maps) > {FP32_PARITY_TARGET:.0e}; not writing it")
    return result


# ------------------------------------------------------------------------------ accuracy


def accuracy_metrics(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
    from edgestad.metrics import au_pro, image_auroc, pixel_auroc

    out: dict[str, Any] = {}
    has_defect_pixels = bool(masks.any())
    has_both_labels = bool(labels.any()) and bool((labels == 0).any())
    out["au_pro"] = float(au_pro(list(maps), list(masks))) if has_defect_pixels else None
    out["pixel_auroc"] = float(pixel_auroc(list(maps), list(masks))) if has_defect_pixels else None
    out["image_auroc"] = float(image_auroc(scores, labels)) if has_both_labels else None
    return out


def accuracy_cost(graphs: dict[str, bytes], test_images: np.ndarray, masks: np.ndarray,
                  labels: np.ndarray, batch_size: int = 4, threads: int | None = None,
                  log: Callable[[str], None] = lambda s: None, boxes: np.ndarray | None = None,
                  thresholds: dict | None = None) -> dict:
    """AU-PRO / AUROCs of every graph on the test set, and the change against the fp32 graph.
    ``boxes``: valid boxes of letterboxed test images (maps are cropped to them for metrics).
    ``thresholds``: the bundle's; each graph's OK/REVIEW/NG decisions are compared with the fp32
    graph's (``same_decision``: the share of test images decided alike)."""
    from edgestad.images import to_eval_grid
    result: dict[str, Any] = {"test_images": int(len(test_images)), "anomalous": int(labels.sum()),
                              "au_pro_integration_limit": 0.3, "baseline": "fp32 graph",
                              "int8_au_pro_target": INT8_AU_PRO_TARGET, "graphs": {}}
    baseline, base_decisions = None, None
    image = (thresholds or {}).get("image")
    review = (thresholds or {}).get("image_review")

    def decide(scores):
        out = np.where(scores > image, 2, 0)
        return out if review is None else np.where((scores > review) & (out == 0), 1, out)

    for precision in ("fp32", "fp16", "int8"):
        if precision not in graphs:
            continue
        t0 = time.perf_counter()
        with OrtRunner(graphs[precision], threads=threads, batch_size=batch_size) as runner:
            maps, scores = runner.infer(test_images, boxes)
        _check_finite(f"the {precision} graph (test set)", maps, scores)
        maps = to_eval_grid(maps, boxes)
        metrics = accuracy_metrics(maps, scores, masks, labels)
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        if image is not None:
            decisions = decide(scores)
            if precision == "fp32":
                base_decisions = decisions
            elif base_decisions is not None:
                metrics["same_decision"] = float((decisions == base_decisions).mean())
                if metrics["same_decision"] < SAME_DECISION_TARGET:
                    good = labels == 0
                    log(f"  WARNING: the {precision} graph decides differently from fp32 on "
                        f"{1 - metrics['same_decision']:.1%} of the test images (good parts NG: "
                        f"{int((decisions[good] == 2).sum())} vs {int((base_decisions[good] == 2).sum())}"
                        f" of {int(good.sum())}): parts that score within its rounding of the "
                        f"bundle's thresholds" + (" - prefer fp16," if precision == "int8" else ";")
                        + f" see `edgestad evaluate B DATA --backend onnx --precision {precision}`")
        if precision == "fp32":
            baseline = metrics
        elif baseline is not None:
            for key in ("au_pro", "pixel_auroc", "image_auroc"):
                if metrics[key] is not None and baseline[key] is not None:
                    metrics[f"delta_{key}"] = metrics[key] - baseline[key]
            if precision == "int8" and "delta_au_pro" in metrics:
                metrics["within_target"] = abs(metrics["delta_au_pro"]) <= INT8_AU_PRO_TARGET
        result["graphs"][precision] = metrics
        au = metrics["au_pro"]
        delta = metrics.get("delta_au_pro")
        log(f"  accuracy {precision}: AU-PRO " + (f"{au:.4f}" if au is not None else "n/a")
            + (f" (change {delta:+.4f})" if delta is not None else "")
            + (f", same decision as fp32 on {metrics['same_decision']:.1%}"
               if "same_decision" in metrics else "")
            + f", {len(test_images)} test images, {metrics['seconds']:.1f} s")
    return result


def parity_table(report: dict) -> list[dict]:
    """Rows (precision, max rel diff vs torch, vs fp32 graph, AU-PRO, change) for READMEs."""
    rows = []
    graphs = report.get("graphs") or {}
    for precision in ("fp32", "fp16", "int8"):
        p = (graphs.get(precision) or {}).get("parity") or {}
        a = (graphs.get(precision) or {}).get("accuracy") or {}
        if not p and not a:
            continue
        rows.append({
            "precision": precision,
            "max_rel_diff_vs_torch": (p.get("vs_torch") or {}).get("max_rel_diff_map"),
            "max_rel_diff_vs_fp32_graph": (p.get("vs_fp32_graph") or {}).get("max_rel_diff_map"),
            "au_pro": a.get("au_pro"),
            "delta_au_pro": a.get("delta_au_pro"),
            "pixel_auroc": a.get("pixel_auroc"),
            "image_auroc": a.get("image_auroc"),
        })
    return rows


def format_table(rows: Sequence[dict]) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)
    lines = ["| precision | max rel diff vs torch | vs fp32 graph | AU-PRO | Δ AU-PRO | pixel AUROC | image AUROC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {f(r['max_rel_diff_vs_torch'], '.2e')} | "
                     f"{f(r['max_rel_diff_vs_fp32_graph'], '.2e')} | {f(r['au_pro'], '.4f')} | "
                     f"{f(r['delta_au_pro'], '+.5f')} | {f(r['pixel_auroc'], '.4f')} | {f(r['image_auroc'], '.4f')} |")
    return "\n".join(lines)
