"""`edgestad demo`: the whole flow on a built-in dataset, no download.

Generates an MVTec-layout dataset from a real texture photograph that ships with scikit-image
(with synthesized scratches, stains and contamination), trains the default method with its default
settings (what `edgestad train DATA --out OUT` does), evaluates the bundle and, when the export
extra is installed, exports the ONNX graphs (fp32, fp16, int8).
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
@click.option("--method", default=None, help="Method (default: the default of `edgestad train`).")
@click.option("--epochs", type=int, default=None, help="Default: the method's.")
@click.option("--export/--no-export", default=True, show_default=True,
              help="Also export the bundle to ONNX (needs edgestad[export]).")
def demo_command(out_dir, texture, method, epochs, export):
    """Train and evaluate a small model on the built-in demo dataset (a few minutes on CPU)."""
    from edgestad.demo_data import ensure_demo_dataset
    from edgestad.evaluate import evaluate_bundle, per_type_table
    from edgestad.methods import get_method
    from edgestad.methods.base import TrainSettings
    from edgestad.train.fit import train_bundle

    started = time.time()
    data = ensure_demo_dataset(out_dir / "data" / texture, texture=texture)
    click.echo(f"demo dataset: {data}")
    from edgestad.methods import DEFAULT_METHOD
    m = get_method(method or DEFAULT_METHOD)
    settings = TrainSettings(epochs=epochs)
    bundle = train_bundle(data, out_dir / "bundle", m.name, m.make_config(resize="auto"), settings,
                          device="cpu", force=True, echo=click.echo)
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
