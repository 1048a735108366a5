"""`edgestad demo`: the whole flow on a built-in dataset, no download.

Generates an MVTec-layout dataset from a real texture photograph that ships with scikit-image
(with synthesized scratches, stains and contamination), trains students on the shipped teachers,
evaluates the bundle and, when the export extra is installed, exports the fused ONNX graph.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for the dataset, bundle and report.")
@click.option("--texture", type=click.Choice(["brick", "grass", "gravel"]), default="brick",
              show_default=True)
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("-p", "--patch-size", "patch_sizes", multiple=True, type=click.Choice(["17", "33", "65"]),
              help="Scales (repeat; default: 17 and 33).")
@click.option("--export/--no-export", default=True, show_default=True,
              help="Also export the bundle to ONNX (needs edgestad[export]).")
def demo_command(out_dir, texture, epochs, patch_sizes, export):
    """Train and evaluate a small model on the built-in demo dataset (a few minutes on CPU)."""
    from edgestad.demo_data import ensure_demo_dataset
    from edgestad.evaluate import evaluate_bundle, per_type_table
    from edgestad.models.uninformed_students import StudentTeacherConfig
    from edgestad.train.fit import TrainSettings, train_bundle

    started = time.time()
    data = ensure_demo_dataset(out_dir / "data" / texture, texture=texture)
    click.echo(f"demo dataset: {data}")
    sizes = tuple(sorted(int(p) for p in patch_sizes)) or (17, 33)
    config = StudentTeacherConfig(patch_sizes=sizes, input_size=(128, 128), dense_stride=1)
    settings = TrainSettings(epochs=epochs, batch_size=1, crop_size=64)
    bundle = train_bundle(data, out_dir / "bundle", config, settings, device="cpu")
    click.echo(f"bundle: {bundle}")
    report = evaluate_bundle(bundle, data, out_dir / "report")
    click.echo(per_type_table(report))
    if export:
        try:
            from edgestad.export.exporter import ExportOptions, export_bundle
        except ImportError as exc:
            click.echo(f"export skipped ({exc}); pip install 'edgestad[export]'")
        else:
            result = export_bundle(bundle, ExportOptions(precisions=("fp32", "fp16", "int8")),
                                   log=click.echo)
            click.echo(f"exported {', '.join(result.written)} into {bundle}")
    summary = {"seconds": round(time.time() - started, 1), "bundle": str(bundle),
               "report": str(out_dir / "report"), "au_pro": report["au_pro"],
               "pixel_auroc": report["pixel_auroc"], "image_auroc": report["image_auroc"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(f"done in {summary['seconds']} s: AU-PRO {report['au_pro']:.3f}, pixel AUROC "
               f"{report['pixel_auroc']:.3f}, image AUROC {report['image_auroc']:.3f}; report in "
               f"{out_dir / 'report'}")
