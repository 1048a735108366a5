"""Accuracy–cost frontier of Uninformed Students configurations (256×256 input).

For each configuration: GFLOP/frame (counted, see edgestad.bench), CPU latency (ONNX Runtime fp32,
batch 1, random weights: cost does not depend on the weights) and, where a trained bundle covers
it, AU-PRO (FPR ≤ 0.3) on the MVTec category.

Where the AU-PRO numbers come from (nothing is invented; untrained rows say so):
- the reference bundle's own evaluation (manifest ``evaluation``: the multi-scale map and, in
  ``per_scale``, each scale alone — a single-scale model with the same students gives exactly that
  map, so its AU-PRO is the single-scale configuration's);
- ``--evaluate DATA``: the same trained weights evaluated at other dense strides and scale subsets
  (dense stride is an inference-time lever: same weights, the dense map sampled every s pixels).
  Results are cached in studies/results/frontier_evaluations.json;
- fused rows compute the same maps as their unfused twin (tests/test_fused.py), so they share its
  AU-PRO.

    python studies/frontier.py --threads 2                       # timing + AU-PRO lookup
    python studies/frontier.py --reuse-timing --evaluate ../shared/data/mvtec_ad/bottle
    python studies/frontier.py --reuse-timing --category magnetic_tile \
        --evaluate ../shared/data/magnetic_tile/magnetic_tile
Writes studies/results/frontier_<category>.json, .md and .png.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASE = {"num_students": 3, "descriptor_dim": 128, "width": 128, "input_size": [256, 256]}
MS = [17, 33, 65]

# (name, patch sizes, dense stride, width, fused). Width 128 is the paper's; width 64 is what the
# CPU-trained bottle bundle has, so those rows can carry a measured AU-PRO.
CONFIGS = [
    ("exact multi-scale", MS, 1, 128, False),
    ("exact multi-scale, fused", MS, 1, 128, True),
    ("multi-scale s2", MS, 2, 128, False),
    ("multi-scale s2, fused", MS, 2, 128, True),
    ("p65 s1", [65], 1, 128, False),
    ("p65 s2", [65], 2, 128, False),
    ("p65 s4", [65], 4, 128, False),
    ("p65 s8", [65], 8, 128, False),
    ("p65 s4, fused", [65], 4, 128, True),
    ("p33+65 s4", [33, 65], 4, 128, False),
    ("p33 s2", [33], 2, 128, False),
    ("p33 s4", [33], 4, 128, False),
    ("p17 s2", [17], 2, 128, False),
    ("exact multi-scale w64", MS, 1, 64, False),
    ("multi-scale s2 w64", MS, 2, 64, False),
    ("multi-scale s2 w64, fused", MS, 2, 64, True),
    ("p65 s1 w64", [65], 1, 64, False),
    ("p65 s2 w64", [65], 2, 64, False),
    ("p65 s4 w64", [65], 4, 64, False),
    ("p65 s8 w64", [65], 8, 64, False),
    ("p65 s8 w64, fused", [65], 8, 64, True),
    ("p33+65 s4 w64", [33, 65], 4, 64, False),
    ("p33 s2 w64", [33], 2, 64, False),
    ("p33 s4 w64", [33], 4, 64, False),
    ("p17 s2 w64", [17], 2, 64, False),
    ("p17+65 s2 w64", [17, 65], 2, 64, False),
    ("multi-scale s2 w32", MS, 2, 32, False),
]
DEFAULT_VARIANTS = "65:4,65:8,33+65:4,33:4,65:1,17+33+65:1"


def config_key(patch_sizes, stride, width, descriptor_dim=128, students=3) -> str:
    return (f"p{'+'.join(str(p) for p in sorted(patch_sizes))}/s{stride}/w{width}/"
            f"d{descriptor_dim}/M{students}")


# ------------------------------------------------------------------------------- AU-PRO
def bundle_evaluations(bundle_paths: list[Path]) -> list[tuple[dict, dict, str]]:
    """(method_config, evaluation, source) of each reference bundle.

    The evaluation is the manifest's, else ``<bundle>_eval/metrics.json`` beside the bundle, else
    the copy studies/real_data.sh commits (``results/<name>_metrics.json`` with the config in
    ``results/<name>_training.json``), so the frontier can be redrawn without the bundle."""
    found = []
    for path in bundle_paths:
        manifest_file = path / "manifest.json"
        committed = RESULTS / f"{path.name}_metrics.json", RESULTS / f"{path.name}_training.json"
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text())
            cfg = manifest.get("method_config", {})
            evaluation = manifest.get("evaluation") or {}
            metrics_file = path.parent / f"{path.name}_eval" / "metrics.json"
            if "au_pro" not in evaluation and metrics_file.is_file():
                evaluation = json.loads(metrics_file.read_text())
            src = f"{path} evaluation"
        elif committed[0].is_file() and committed[1].is_file():
            evaluation = json.loads(committed[0].read_text())
            cfg = json.loads(committed[1].read_text())["method_config"]
            src = f"{committed[0].relative_to(HERE.parent)}"
        else:
            continue
        if "au_pro" in evaluation:
            found.append((cfg, evaluation, f"{src} ({evaluation.get('test_images', '?')} test images)"))
    return found


def aupro_records(bundle_paths: list[Path], cache: list[dict]) -> dict[str, dict]:
    """config key → {"au_pro", "source"} from bundle evaluations and cached variant evaluations."""
    records: dict[str, dict] = {}
    for cfg, evaluation, src in bundle_evaluations(bundle_paths):
        common = (cfg["dense_stride"], cfg["width"], cfg["descriptor_dim"], cfg["num_students"])
        records[config_key(cfg["patch_sizes"], *common)] = {
            "au_pro": evaluation["au_pro"], "source": src,
            "image_auroc": evaluation.get("image_auroc")}
        for name, scale in (evaluation.get("parts") or evaluation.get("per_scale") or {}).items():
            records.setdefault(config_key([int(name.lstrip("p"))], *common), {
                "au_pro": scale["au_pro"], "source": f"{src}, part {name}",
                "image_auroc": scale.get("image_auroc")})
    for item in cache:
        records.setdefault(item["key"], {"au_pro": item["au_pro"], "image_auroc":
                                         item.get("image_auroc"),
                                         "source": f"{item['bundle']} re-evaluated at "
                                                   f"dense stride {item['dense_stride']}"})
    return records


def dataset_name(data: str | Path) -> str:
    """The category a dataset folder holds (…/mvtec_ad/bottle → bottle)."""
    return Path(data).name


def evaluate_variants(bundle_path: Path, data: Path, variants: list[tuple[list[int], int]],
                      threads: int, batch_size: int = 2) -> list[dict]:
    """AU-PRO of a trained bundle at other (scale subset, dense stride) pairs, one pass per stride."""
    import torch
    from edgestad.bundle import load_bundle
    from edgestad.datasets import load_test_set
    from edgestad.evaluate import compute_metrics
    from edgestad.methods import build_model
    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    h, w = manifest["input"]["height"], manifest["input"]["width"]
    images, masks, labels, defect_types, _ = load_test_set(data, (h, w))
    weights = {k: torch.from_numpy(v.copy()) for k, v in bundle.weights().items()}
    out = []
    for stride in sorted({s for _, s in variants}):
        wanted = [ps for ps, s in variants if s == stride]
        scales = sorted({p for ps in wanted for p in ps})
        config = dict(manifest["method_config"], dense_stride=stride, patch_sizes=scales)
        model = build_model(manifest["method"], config)
        # The bundle holds more scales than this subset needs: load what the subset has, and
        # insist that nothing the subset needs is missing.
        missing, _ = model.load_state_dict(weights, strict=False)
        if missing:
            raise click.ClickException(f"{bundle_path} lacks weights for {missing[:3]}")
        model.eval()
        maps = {p: [] for p in scales}
        start = time.time()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = model.normalize_input(torch.from_numpy(images[i:i + batch_size])
                                          .permute(0, 3, 1, 2))
                for p in scales:
                    maps[p].append(model.upsample(model.scale_score(x, p), h, w)[:, 0].numpy())
        maps = {p: np.concatenate(v) for p, v in maps.items()}
        seconds = time.time() - start
        for ps in wanted:
            fused = sum(maps[p] for p in ps) / len(ps)
            m = compute_metrics(fused.astype(np.float32), masks, labels, defect_types)
            c = manifest["method_config"]
            out.append({"key": config_key(ps, stride, c["width"], c["descriptor_dim"],
                                          c["num_students"]),
                        "bundle": str(bundle_path), "data": str(data), "patch_sizes": ps,
                        "dense_stride": stride, "au_pro": m["au_pro"],
                        "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                        "test_images": int(len(images)), "seconds_all_scales": round(seconds, 1)})
            click.echo(f"evaluated p{'+'.join(map(str, ps))} s{stride}: AU-PRO {m['au_pro']:.4f}",
                       err=True)
    return out


# -------------------------------------------------------------------------------- timing
def time_configs(threads: int, iterations: int, max_seconds: float, previous: dict) -> list[dict]:
    from edgestad.bench.run import run_bench
    from edgestad.bench.subjects import Subject, peer_model, random_uninformed_students
    from edgestad.methods.uninformed_students.fused import fuse_model
    rows = []
    size = tuple(BASE["input_size"])
    subjects = []
    for name, ps, stride, width, fused in CONFIGS:
        cfg = dict(BASE, patch_sizes=ps, dense_stride=stride, width=width)
        model = random_uninformed_students(cfg)
        subjects.append((name, cfg, fused, Subject(name, fuse_model(model) if fused else model,
                                                   "random weights", "uninformed_students",
                                                   model.config.to_dict(), fused=fused)))
    subjects.append(("EfficientAD-S (peer)", {"input_size": list(size)}, False,
                     Subject("efficientad-s", peer_model("efficientad-s", size), "random weights",
                             "peer", {"input_size": list(size)})))
    for name, cfg, fused, subject in subjects:
        if name in previous:
            rows.append(previous[name])
            continue
        click.echo(f"timing {name}", err=True)
        report = run_bench([subject], size, ["ort-fp32"], [1], warmup=1, iterations=iterations,
                           max_seconds=max_seconds, threads=threads)
        entry = report["models"][0]
        result = entry["results"][0]
        rows.append({"name": name, "patch_sizes": cfg.get("patch_sizes"),
                     "dense_stride": cfg.get("dense_stride"), "width": cfg.get("width"),
                     "fused": fused, "peer": subject.method == "peer",
                     "gflop_per_frame": entry["gflop_per_frame"],
                     "gflop_per_frame_onnx_conv": entry["gflop_per_frame_onnx_conv"],
                     "ort_fp32_b1": {k: result.get(k) for k in
                                     ("status", "iterations", "latency_ms", "throughput_fps",
                                      "note")},
                     "machine": report["machine"]})
    return rows


# ------------------------------------------------------------------------------ reporting
def attach_aupro(rows: list[dict], records: dict[str, dict]) -> None:
    for row in rows:
        if row["peer"]:
            row["au_pro"], row["au_pro_source"] = None, "peer: random weights (timing only)"
            continue
        key = config_key(row["patch_sizes"], row["dense_stride"], row["width"],
                         BASE["descriptor_dim"], BASE["num_students"])
        row["key"] = key
        rec = records.get(key)
        if rec:
            row["au_pro"] = rec["au_pro"]
            row["au_pro_source"] = rec["source"] + (" (fused: same maps as unfused)"
                                                    if row["fused"] else "")
        else:
            row["au_pro"], row["au_pro_source"] = None, "not trained (CPU budget)"


def reference(rows: list[dict]) -> tuple[dict | None, str]:
    """The AU-PRO reference: the exact (stride 1) multi-scale model, widest trained width first;
    failing that, the smallest evaluated stride of the multi-scale model (then marked a proxy)."""
    multi = [r for r in rows if not r["peer"] and not r["fused"] and r.get("au_pro") is not None
             and sorted(r["patch_sizes"]) == MS]
    if not multi:
        return None, "none evaluated"
    best = min(multi, key=lambda r: (r["dense_stride"], -r["width"]))
    if best["dense_stride"] == 1:
        return best, f"{best['name']} (exact multi-scale of the trained width)"
    return best, f"{best['name']} (proxy: the exact stride-1 multi-scale map was not evaluated)"


def markdown(rows: list[dict]) -> str:
    exact = next(r for r in rows if r["name"] == "exact multi-scale")
    ref, ref_name = reference(rows)
    lines = [f"AU-PRO reference: {ref_name}.", "",
             "| configuration | fused | GFLOP/frame | × exact | ORT fp32 CPU p50 ms (b=1) | "
             "frames/s | AU-PRO | Δ vs ref | ≤1/20 exact & Δ≤0.01 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = r["ort_fp32_b1"]
        lat = f"{t['latency_ms']['p50']:.0f}" if t.get("status") == "ok" else t.get("status")
        fps = f"{t['throughput_fps']:.2f}" if t.get("status") == "ok" else ""
        ratio = r["gflop_per_frame"] / exact["gflop_per_frame"]
        if r.get("au_pro") is not None:
            au = f"{r['au_pro']:.3f}"
            delta = r["au_pro"] - ref["au_pro"] if ref else None
            d = f"{delta:+.3f}" if delta is not None else ""
            meets = ("yes" if ratio <= 1 / 20 and delta is not None and delta >= -0.01
                     else "no")
        else:
            au, d = ("—" if r["peer"] else "not trained (CPU budget)"), ""
            meets = "cost only" if ratio <= 1 / 20 and not r["peer"] else ""
        lines.append(f"| {r['name']} | {'yes' if r['fused'] else ''} | "
                     f"{r['gflop_per_frame']:.1f} | 1/{1 / ratio:.1f} | {lat} | {fps} | {au} | "
                     f"{d} | {meets} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, category: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    trained = [r for r in rows if r.get("au_pro") is not None and not r["fused"]]
    for r in trained:
        ax1.scatter(r["gflop_per_frame"], r["au_pro"], color="C0")
        ax1.annotate(r["name"], (r["gflop_per_frame"], r["au_pro"]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    exact = next(r for r in rows if r["name"] == "exact multi-scale")
    ax1.axvline(exact["gflop_per_frame"] / 20, color="gray", ls="--", lw=0.8)
    ax1.text(exact["gflop_per_frame"] / 20, ax1.get_ylim()[0] if trained else 0.5,
             " 1/20 of exact", fontsize=7, color="gray")
    ax1.set_xscale("log")
    ax1.set_xlabel("GFLOP / frame (256², log)")
    ax1.set_ylabel("AU-PRO (FPR ≤ 0.3)")
    ax1.set_title(f"{category}: accuracy vs cost (trained configurations)" if trained
                  else "accuracy vs cost: no trained bundle found")
    for r in rows:
        t = r["ort_fp32_b1"]
        if t.get("status") != "ok":
            continue
        color = "C3" if r["peer"] else ("C2" if r["fused"] else "C0")
        ax2.scatter(r["gflop_per_frame"], t["latency_ms"]["p50"], color=color)
        ax2.annotate(r["name"], (r["gflop_per_frame"], t["latency_ms"]["p50"]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("GFLOP / frame (256², log)")
    ax2.set_ylabel("ONNX Runtime fp32 CPU latency, batch 1 (ms, log)")
    ax2.set_title("cost vs CPU latency (blue ours, green fused, red EfficientAD-S)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--runs", type=click.Path(path_type=Path), default=Path("/work/runs"),
              show_default=True, help="Folder of trained bundles.")
@click.option("--category", default="bottle", show_default=True)
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path),
              help="Reference bundle(s) for AU-PRO (default: RUNS/CATEGORY).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--iterations", type=int, default=3, show_default=True)
@click.option("--max-seconds", type=float, default=30.0, show_default=True)
@click.option("--reuse-timing", is_flag=True, help="Keep latencies from the existing frontier.json.")
@click.option("--evaluate", "eval_data", type=click.Path(exists=True, path_type=Path),
              help="Evaluate the reference bundle at other strides/scale subsets on this data.")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True,
              help="scales:stride pairs for --evaluate.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(runs, category, bundles, threads, iterations, max_seconds, reuse_timing, eval_data,
         variants, out):
    from edgestad.files import atomic_write_json
    out.mkdir(parents=True, exist_ok=True)
    bundles = list(bundles) or [runs / category]
    cache_file = out / "frontier_evaluations.json"   # all categories, one list
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else []
    if eval_data:
        pairs = []
        for item in variants.split(","):
            scales, stride = item.split(":")
            pairs.append(([int(p) for p in scales.split("+")], int(stride)))
        new = evaluate_variants(bundles[0], eval_data, pairs, threads)
        replaced = {(n["key"], dataset_name(n["data"])) for n in new}
        cache = [c for c in cache
                 if (c["key"], dataset_name(c["data"])) not in replaced] + new
        atomic_write_json(cache_file, cache)
    cache = [c for c in cache if dataset_name(c["data"]) == category]
    previous = {}
    frontier_file = out / f"frontier_{category}.json"
    if reuse_timing:   # latencies do not depend on the category: take them from any frontier file
        for older in sorted(out.glob("frontier_*.json")):
            if older.name != cache_file.name:
                previous.update({r["name"]: r for r in json.loads(older.read_text())["rows"]})
    rows = time_configs(threads, iterations, max_seconds, previous)
    attach_aupro(rows, aupro_records(bundles, cache))
    ref, ref_name = reference(rows)
    atomic_write_json(frontier_file, {
        "schema": "edgestad-frontier/1", "category": category,
        "reference_bundles": [str(b) for b in bundles], "au_pro_reference": ref_name,
        "evaluations": cache,
        "input_size": BASE["input_size"], "command": " ".join(["python", *sys.argv]),
        "rows": rows})
    table = markdown(rows)
    (out / f"frontier_{category}.md").write_text(table + "\n")
    plot(rows, out / f"frontier_{category}.png", category)
    click.echo(table)


if __name__ == "__main__":
    main()
