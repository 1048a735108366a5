"""`edgestad evaluate`: a bundle on an MVTec-layout test set.

Writes metrics.json (AU-PRO up to FPR 0.3, pixel AUROC, image AUROC; overall, per scale and per
defect type), a per-defect-type table, the PRO-curve plot and overlays of the best and worst cases.
Maps and image scores come from the PyTorch model (``--backend torch``) or an exported ONNX graph
run by ONNX Runtime (``--backend onnx``); image AUROC uses the bundle's own image-score rule, and
the OK/NG decisions at the bundle's image threshold are reported beside it. Letterboxed maps are
cropped to their image and resampled onto the masks' grid before any metric.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from edgestad import metrics
from edgestad.bundle import add_files, load_bundle
from edgestad.contract import uses_valid_box
from edgestad.images import map_to_eval_grid, to_eval_grid
from edgestad.datasets import load_test_set  # noqa: F401 (re-exported)
from edgestad.runner import EVALUATE_BACKENDS, backend_spellings, canonical_backend


def torch_maps(bundle, images: np.ndarray, boxes: np.ndarray | None, device: str = "cpu",
               batch_size: int = 4, parts: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"model": (maps N×H×W, scores N), <part>: ...} from the bundle's PyTorch model; the parts
    are the method's named partial maps (per level / scale), scored by the same image-score rule."""
    import torch
    from edgestad.methods import get_method, load_model
    from edgestad.torch_loop import batches

    model = load_model(bundle, device)
    method = get_method(bundle.manifest["method"])
    boxes = boxes if model.takes_valid_box else None
    out: dict[str, list] = {}
    with torch.no_grad():
        for batch, box in batches(images.transpose(0, 3, 1, 2), boxes, batch_size, device):
            amap, map_score, global_score = model.scores(batch, box)
            score = (map_score if global_score is None
                     else model.score_fusion(map_score, global_score))
            out.setdefault("model", []).append((amap[:, 0].cpu().numpy(), score.cpu().numpy()))
            if global_score is not None:
                # the image score's two parts, for the report of each one's contribution
                out.setdefault("score:map", []).append((None, map_score.cpu().numpy()))
                out.setdefault("score:global", []).append((None, global_score.cpu().numpy()))
            if parts:
                named = method.parts(model, model.normalize_input(batch))
                for key, part in (named.items() if len(named) > 1 else ()):
                    part_map, part_score = model.finish(part, box)
                    out.setdefault(key, []).append((part_map[:, 0].cpu().numpy(),
                                                    part_score.cpu().numpy()))
    return {k: (None if v[0][0] is None else np.concatenate([m for m, _ in v]).astype(np.float32),
                np.concatenate([s for _, s in v]).astype(np.float32)) for k, v in out.items()}


def onnx_maps(onnx_path: Path, images: np.ndarray, boxes: np.ndarray | None,
              batch_size: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from edgestad.runner import run_graph
    return {"model": run_graph(onnx_path, images.transpose(0, 3, 1, 2), boxes,
                               batch_size=batch_size)}


def compute_metrics(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                    defect_types: list[str], scores: np.ndarray | None = None,
                    integration_limit: float = 0.3) -> dict:
    """Overall and per-defect-type metrics; ``scores`` are the image scores (default: map max)."""
    if scores is None:
        scores = maps.reshape(len(maps), -1).max(axis=1)
    result = {
        "au_pro": metrics.au_pro(list(maps), list(masks), integration_limit),
        "pixel_auroc": metrics.pixel_auroc(list(maps), list(masks)),
        "image_auroc": metrics.image_auroc(scores, labels),
        "per_defect_type": {},
    }
    good = [i for i, t in enumerate(defect_types) if t == "good"]
    for defect in sorted(set(defect_types) - {"good"}):
        idx = good + [i for i, t in enumerate(defect_types) if t == defect]
        entry = {"images": len(idx) - len(good),
                 "image_auroc": metrics.image_auroc(scores[idx], labels[idx])}
        if masks[idx].any():
            entry["au_pro"] = metrics.au_pro([maps[i] for i in idx], [masks[i] for i in idx],
                                             integration_limit)
            entry["pixel_auroc"] = metrics.pixel_auroc([maps[i] for i in idx],
                                                       [masks[i] for i in idx])
        result["per_defect_type"][defect] = entry
    return result


def decisions_line(d: dict) -> str:
    """'at the bundle's image threshold T: 77/119 defective parts NG, 5/41 good parts NG (12.2 %,
    95 % interval 4.1–26.2 %; promised 3.0 % on average, below 6.9 % with 90 % confidence)'."""
    good = f"{d['good_ng']}/{d['good_total']} good parts NG"
    detail = []
    if d.get("good_rejected_interval_95"):
        lo, hi = d["good_rejected_interval_95"]
        detail.append(f"{100 * d['good_rejected']:.1f} %, 95 % interval "
                      f"{100 * lo:.1f}–{100 * hi:.1f} %")
    if d.get("promised_good_rejected") is not None:
        from edgestad.thresholds import describe_promise
        detail.append("promised " + describe_promise(d["promised_good_rejected"],
                                                    d.get("promise_bound")))
    if detail:
        good += f" ({'; '.join(detail)})"
    return (f"at the bundle's image threshold {d['threshold']:.4g}: "
            f"{d['defective_ng']}/{d['defective_total']} defective parts NG, {good}")


def decisions(scores: np.ndarray, labels: np.ndarray, threshold: float,
              review: float | None = None, promised: float | None = None,
              promise_bound: float | None = None) -> dict:
    """OK/NG (and REVIEW) at the bundle's image threshold(s): defective parts caught, good parts
    rejected with the 95 % interval of that rate (a few dozen test goods leave it wide), beside
    the false-reject rate the bundle promised and its 90 % bound."""
    from edgestad.thresholds import rate_interval
    ng = scores > threshold
    bad, good = labels == 1, labels == 0
    out = {"threshold": float(threshold),
           "defective_ng": int((ng & bad).sum()), "defective_total": int(bad.sum()),
           "good_ng": int((ng & good).sum()), "good_total": int(good.sum()),
           "defective_caught": float((ng & bad).sum() / max(1, bad.sum())),
           "good_rejected": float((ng & good).sum() / max(1, good.sum())),
           "promised_good_rejected": promised, "promise_bound": promise_bound}
    if good.any():
        out["good_rejected_interval_95"] = list(rate_interval(out["good_ng"], out["good_total"]))
    if review is not None:
        flagged = (scores > review) & ~ng
        out.update(review_threshold=float(review), defective_review=int((flagged & bad).sum()),
                   good_review=int((flagged & good).sum()))
    return out


def write_image_scores(path: Path, paths, defect_types, labels, scores, thresholds: dict) -> None:
    """One row per test image: path, defect type, label, image score and the decision at the
    bundle's thresholds, so the parts a line would have rejected can be looked at one by one."""
    import csv
    image, review = thresholds.get("image"), thresholds.get("image_review")
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "defect_type", "label", "score", "decision"])
        for p, kind, label, score in zip(paths, defect_types, labels, scores):
            decision = ("" if image is None else "NG" if score > image
                        else "REVIEW" if review is not None and score > review else "OK")
            out.writerow([str(p), kind, int(label), f"{float(score):.9g}", decision])


def model_line(manifest: dict) -> str:
    """"stfpm (backbone efficientnet-lite0, weights sha256 5793…)" for every printed result."""
    backbone = manifest.get("backbone") or {}
    text = manifest.get("method", "?")
    if backbone.get("name"):
        text += f" (backbone {backbone['name']}"
        if backbone.get("sha256"):
            text += f", weights sha256 {backbone['sha256'][:12]}"
        text += ")"
    return text


def evaluate_bundle(bundle_path: Path, data: Path, out_dir: Path, backend: str = "torch",
                    precision: str = "fp32", device: str = "cpu", batch_size: int = 4,
                    plots: bool = True, record: bool = True) -> dict:
    try:
        backend = canonical_backend(backend, EVALUATE_BACKENDS)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--backend") from None
    bundle = load_bundle(bundle_path)
    reading = bundle.reading                    # input size, resize rule, region of interest
    images, masks, labels, defect_types, paths, boxes = load_test_set(data, **reading, with_boxes=True)
    boxes = boxes if uses_valid_box(bundle.manifest["input"]) else None
    start = time.time()
    if backend == "torch":
        outputs = torch_maps(bundle, images, boxes, device, batch_size)
    else:  # onnx
        name = bundle.manifest.get("exports", {}).get("onnx", {}).get(precision)
        if not name:
            raise click.ClickException(f"bundle {bundle_path} has no exported {precision} ONNX "
                                       f"graph; run 'edgestad export {bundle_path} --precision "
                                       f"{precision}' first")
        from edgestad.bundle_thresholds import check_graph_thresholds
        check_graph_thresholds(bundle, [name])  # decisions below use the manifest's thresholds
        outputs = onnx_maps(bundle.file(name), images, boxes, batch_size)
    seconds = time.time() - start
    score_parts = {k.split(":", 1)[1]: s for k, (m, s) in outputs.items() if m is None}
    outputs = {k: v for k, v in outputs.items() if v[0] is not None}
    all_maps = {k: to_eval_grid(m, boxes) for k, (m, _) in outputs.items()}
    results = {key: compute_metrics(all_maps[key], masks, labels, defect_types, outputs[key][1])
               for key in all_maps}
    report = {"bundle": str(bundle_path), "data": str(data), "backend": backend,
              "method": bundle.manifest["method"], "backbone": bundle.manifest.get("backbone"),
              "model": model_line(bundle.manifest),
              "image_score_rule": bundle.manifest.get("image_score", "max"),
              "resize": reading["resize"], **({"roi": reading["roi"]} if reading["roi"] else {}),
              "precision": precision if backend == "onnx" else "fp32 (torch)",
              "test_images": int(len(images)), "anomalous": int(labels.sum()),
              "seconds": round(seconds, 1), **results["model"],
              "parts": {k: {m: v[m] for m in ("au_pro", "pixel_auroc", "image_auroc")}
                        for k, v in results.items() if k != "model"},
              "thresholds": bundle.manifest.get("thresholds")}
    if score_parts:
        # what each part of the fused image score detects on its own (same images)
        report["image_score_parts"] = {
            **{k: {"image_auroc": metrics.image_auroc(v, labels)} for k, v in score_parts.items()},
            "fused": {"image_auroc": report["image_auroc"]}}
    thresholds = bundle.manifest.get("thresholds") or {}
    if "image" in thresholds:
        report["decisions_at_bundle_threshold"] = decisions(
            outputs["model"][1], labels, thresholds["image"], thresholds.get("image_review"),
            (thresholds.get("rule") or {}).get("image_promised_false_reject"),
            (thresholds.get("rule") or {}).get("image_promise_bound"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    (out_dir / "per_defect_type.md").write_text(per_type_table(report))
    write_image_scores(out_dir / "scores.csv", paths, defect_types, labels, outputs["model"][1],
                       thresholds)
    if plots:
        plot_pro_curves(all_maps, masks, out_dir / "pro_curve.png")
        save_overlays(images if boxes is None else _eval_grid_images(images, boxes),
                      all_maps["model"], masks, labels, defect_types, paths, out_dir)
    if record and bundle.path == Path(bundle_path):
        add_files(bundle_path, {}, {"evaluation": {
            k: report[k] for k in ("data", "backend", "precision", "au_pro", "pixel_auroc",
                                   "image_auroc", "parts", "image_score_parts", "test_images",
                                   "decisions_at_bundle_threshold") if k in report}})
    return report


def _eval_grid_images(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for i, (img, box) in enumerate(zip(images, boxes)):
        for c in range(3):
            out[i, ..., c] = map_to_eval_grid(img[..., c].astype(np.float32), box).clip(0, 255)
    return out


def per_type_table(report: dict) -> str:
    lines = ["| defect type | images | AU-PRO (0.3) | pixel AUROC | image AUROC |",
             "|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for name, e in report["per_defect_type"].items():
        lines.append(f"| {name} | {e['images']} | {fmt(e.get('au_pro'))} | "
                     f"{fmt(e.get('pixel_auroc'))} | {fmt(e['image_auroc'])} |")
    lines.append(f"| **all** | {report['anomalous']} | {fmt(report['au_pro'])} | "
                 f"{fmt(report['pixel_auroc'])} | {fmt(report['image_auroc'])} |")
    return "\n".join(lines) + "\n"


def plot_pro_curves(all_maps: dict, masks: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, maps in all_maps.items():
        fprs, pros = metrics.pro_curve(list(maps), list(masks))
        area = metrics.au_pro(list(maps), list(masks))
        keep = fprs <= 0.3
        ax.plot(fprs[keep], pros[keep], label=f"{key} (AU-PRO {area:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("per-region overlap")
    ax.set_xlim(0, 0.3)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_overlays(images, maps, masks, labels, defect_types, paths, out_dir: Path,
                  count: int = 3) -> None:
    """Best and worst anomalous images (by their own-region AUROC) and good images (by score)."""
    import cv2
    from edgestad.overlay import overlay

    folder = out_dir / "overlays"
    folder.mkdir(exist_ok=True)
    lo, hi = np.percentile(maps, 1), np.percentile(maps, 99.9)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    anomalous = [i for i in range(len(maps)) if labels[i] and masks[i].any()]
    quality = {i: metrics.pixel_auroc([maps[i]], [masks[i]]) for i in anomalous
               if not masks[i].all()}
    ranked = sorted(quality, key=quality.get)
    good = [i for i in range(len(maps)) if not labels[i]]
    picks = {"worst_defect": ranked[:count], "best_defect": ranked[::-1][:count],
             "worst_good": sorted(good, key=lambda i: -scores[i])[:count]}
    for kind, indices in picks.items():
        for rank, i in enumerate(indices):
            img = overlay(images[i], maps[i], lo, hi, masks[i])
            name = f"{kind}_{rank}_{defect_types[i]}_{Path(paths[i]).stem}.png"
            cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@click.command("evaluate")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: <bundle>/../<bundle name>_eval).")
@click.option("--backend", type=click.Choice(backend_spellings(EVALUATE_BACKENDS)),
              default="torch", show_default=True,
              help="torch: the PyTorch model; onnx (also onnxruntime, ort): an exported graph.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which exported graph --backend onnx runs.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device for --backend torch: cpu, cuda, or auto (CUDA when available).")
@click.option("--batch-size", type=int, default=4, show_default=True)
def evaluate_command(bundle, data, out_dir, backend, precision, device, batch_size):
    """Evaluate BUNDLE on the MVTec-layout category DATA."""
    backend = canonical_backend(backend, EVALUATE_BACKENDS)
    if backend == "torch":
        from edgestad.torch_loop import choose_device
        device = choose_device(device)
    out_dir = out_dir or bundle.parent / f"{bundle.name}_eval"
    report = evaluate_bundle(bundle, data, out_dir, backend, precision, device, batch_size)
    click.echo(f"model: {report['model']}; image score: {report['image_score_rule']}; "
               f"resize: {report['resize']}")
    click.echo(per_type_table(report))
    for key, m in report["parts"].items():
        click.echo(f"{key}: AU-PRO {m['au_pro']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  "
                   f"image AUROC {m['image_auroc']:.3f}")
    for key, m in (report.get("image_score_parts") or {}).items():
        click.echo(f"image score part {key}: image AUROC {m['image_auroc']:.3f}")
    d = report.get("decisions_at_bundle_threshold")
    if d:
        click.echo(decisions_line(d))
        if "review_threshold" in d:
            click.echo(f"REVIEW band above {d['review_threshold']:.4g}: "
                       f"{d['defective_review']} defective and {d['good_review']} good parts REVIEW")
    click.echo(f"report written to {out_dir}")
