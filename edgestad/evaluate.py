"""`edgestad evaluate`: a bundle on an MVTec-layout test set.

Writes metrics.json (AU-PRO up to FPR 0.3, pixel AUROC, image AUROC; overall, per scale and per
defect type), a per-defect-type table, the PRO-curve plot and overlays of the best and worst cases.
Maps come from the PyTorch model (``--backend torch``) or an exported ONNX graph run by ONNX
Runtime (``--backend onnx``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from edgestad import metrics
from edgestad.bundle import add_files, load_bundle
from edgestad.data import load_test_set


def torch_maps(bundle, images: np.ndarray, device: str = "cpu", batch_size: int = 4,
               per_scale: bool = True) -> dict[str, np.ndarray]:
    """{"fused": N×H×W, "p17": ..., ...} from the bundle's PyTorch model."""
    import torch
    from edgestad.models import load_model

    model = load_model(bundle, device)
    h, w = images.shape[1:3]
    out: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
            x = model.normalize_input(batch.to(device))
            scales = {}
            for p in model.config.patch_sizes:
                scales[f"p{p}"] = model.upsample(model.scale_score(x, p), h, w)[:, 0]
            fused = sum(scales.values()) / len(scales)
            if per_scale and len(scales) > 1:
                for key, value in scales.items():
                    out.setdefault(key, []).append(value.cpu().numpy())
            out.setdefault("fused", []).append(fused.cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def onnx_maps(onnx_path: Path, images: np.ndarray, batch_size: int = 4) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    maps = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2))
        maps.append(session.run(["anomaly_map"], {"images": batch})[0][:, 0])
    return {"fused": np.concatenate(maps).astype(np.float32)}


def compute_metrics(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                    defect_types: list[str], integration_limit: float = 0.3) -> dict:
    """Overall and per-defect-type metrics; the image score is the maximum of each map."""
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


def evaluate_bundle(bundle_path: Path, data: Path, out_dir: Path, backend: str = "torch",
                    precision: str = "fp32", device: str = "cpu", batch_size: int = 4,
                    plots: bool = True, record: bool = True) -> dict:
    bundle = load_bundle(bundle_path)
    h, w = bundle.input_size
    images, masks, labels, defect_types, paths = load_test_set(data, (h, w))
    start = time.time()
    if backend == "torch":
        all_maps = torch_maps(bundle, images, device, batch_size)
    elif backend == "onnx":
        name = bundle.manifest.get("exports", {}).get("onnx", {}).get(precision)
        if not name:
            raise click.ClickException(f"bundle {bundle_path} has no exported {precision} ONNX "
                                       f"graph; run 'edgestad export {bundle_path} --precision "
                                       f"{precision}' first")
        all_maps = onnx_maps(bundle.file(name), images, batch_size)
    else:
        raise click.BadParameter(f"unknown backend {backend!r}", param_hint="--backend")
    seconds = time.time() - start
    results = {key: compute_metrics(m, masks, labels, defect_types)
               for key, m in all_maps.items()}
    report = {"bundle": str(bundle_path), "data": str(data), "backend": backend,
              "precision": precision if backend == "onnx" else "fp32 (torch)",
              "test_images": int(len(images)), "anomalous": int(labels.sum()),
              "seconds": round(seconds, 1), **results["fused"],
              "per_scale": {k: {m: v[m] for m in ("au_pro", "pixel_auroc", "image_auroc")}
                            for k, v in results.items() if k != "fused"},
              "thresholds": bundle.manifest.get("thresholds")}
    thresholds = bundle.manifest.get("thresholds") or {}
    if "image" in thresholds:
        scores = all_maps["fused"].reshape(len(images), -1).max(axis=1)
        ng = scores > thresholds["image"]
        report["decisions_at_bundle_threshold"] = {
            "true_ng": int((ng & (labels == 1)).sum()), "missed": int((~ng & (labels == 1)).sum()),
            "false_ng": int((ng & (labels == 0)).sum()), "true_ok": int((~ng & (labels == 0)).sum())}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    (out_dir / "per_defect_type.md").write_text(per_type_table(report))
    if plots:
        plot_pro_curves(all_maps, masks, out_dir / "pro_curve.png")
        save_overlays(images, all_maps["fused"], masks, labels, defect_types, paths, out_dir)
    if record and bundle.path == Path(bundle_path):
        add_files(bundle_path, {}, {"evaluation": {
            k: report[k] for k in ("data", "backend", "precision", "au_pro", "pixel_auroc",
                                   "image_auroc", "per_scale", "test_images")}})
    return report


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
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Which exported graph --backend onnx runs.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
def evaluate_command(bundle, data, out_dir, backend, precision, device, batch_size):
    """Evaluate BUNDLE on the MVTec-layout category DATA."""
    out_dir = out_dir or bundle.parent / f"{bundle.name}_eval"
    report = evaluate_bundle(bundle, data, out_dir, backend, precision, device, batch_size)
    click.echo(per_type_table(report))
    for key, m in report["per_scale"].items():
        click.echo(f"{key}: AU-PRO {m['au_pro']:.3f}  pixel AUROC {m['pixel_auroc']:.3f}  "
                   f"image AUROC {m['image_auroc']:.3f}")
    click.echo(f"report written to {out_dir}")
