"""`edgestad export`: ONNX graphs per precision (+ TensorRT engines where TensorRT exists).

Imports nothing heavy at module level: the command must start on a Jetson without torch, where it
reuses the bundle's graphs and only builds engines.
"""
from __future__ import annotations

from pathlib import Path

import click

from .onnx_export import DEFAULT_INT8_FP16_STRIDE, INT8_FP16_STRIDES

PRECISION_CHOICES = ["fp32", "fp16", "int8", "all"]


@click.command("export")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("-p", "--precision", "precisions", multiple=True,
              type=click.Choice(PRECISION_CHOICES, case_sensitive=False),
              help="Graph/engine precision; repeat for several, or 'all' (default: all). The fp32 "
                   "graph is always written: it is the reference and the source of the others.")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True,
              help="ONNX opset (17 parses on TensorRT 8.6 and 10; 18+ on TensorRT 10).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch the TensorRT engine is optimised for. ONNX graphs always take any batch "
                   "(dynamic dimension 'batch').")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch a TensorRT engine accepts (profile 1..max-batch).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Good training images used to calibrate int8 ranges.")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True,
              help="int8 range rule (percentile/entropy keep all activations in memory).")
@click.option("--int8-fp16-stride", type=click.Choice([str(s) for s in (0, *INT8_FP16_STRIDES)]),
              default=str(DEFAULT_INT8_FP16_STRIDE),
              show_default=True,
              help="int8 graph: the pretrained backbones' layers up to this stride (stem and first "
                   "stages) are not quantized but run in fp16; 0 quantizes every convolution but "
                   "those feeding the global branch (always fp16).")
@click.option("--calibration-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Dataset folder with the good images (default: the bundle's "
                                 "provenance.data). Also used for parity and accuracy.")
@click.option("--parity-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Good training images on which graphs are compared with the torch model.")
@click.option("--accuracy/--no-accuracy", default=True, show_default=True,
              help="Measure AU-PRO / AUROC of every graph on the dataset's test set.")
@click.option("--workspace-mb", type=click.IntRange(min=16), default=1024, show_default=True,
              help="TensorRT builder workspace limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Persistent TensorRT timing cache file (default: "
                   "~/.cache/edgestad/tensorrt/timing_<gpu>_sm<cc>_trt<version>.cache).")
@click.option("--engine/--no-engine", "engine", default=None,
              help="Build TensorRT engines (default: when TensorRT and a GPU are present).")
@click.option("--form", default="default", show_default=True,
              help="A deploy form of the method: uninformed_students has 'fused' (each scale's "
              "teacher and students as one grouped network; same maps). See README Performance.")
@click.option("--fused", "fused", is_flag=True, help="Same as --form fused.")
@click.option("--force", is_flag=True, help="Re-export graphs even when the bundle's are current.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads for the parity/accuracy runs (default: all cores).")
def export(bundle, precisions, opset, batch, max_batch, calibration_images, calibration_method,
           int8_fp16_stride, calibration_data, parity_images, accuracy, workspace_mb, timing_cache,
           engine, form, fused, force, threads):
    """Export BUNDLE to ONNX graphs (model.onnx, model.fp16.onnx, model.int8.onnx) and, where
    TensorRT and a GPU are present, TensorRT engines, all added to the bundle.

    BUNDLE defaults to $EDGESTAD_BUNDLE or `bundle = "..."` in ./edgestad.toml.

    Graph I/O: input `images` uint8 N x 3 x H x W, RGB, 0..255 (N dynamic), and for letterbox
    bundles `valid_box` float32 N x 4; outputs `anomaly_map` float32 N x 1 x H x W and
    `image_score` float32 N, by the bundle's own image-score rule (set at training: `max`, or
    `topk:F`, the mean of the map's top F of pixels; fused with the global score where the
    method's global branch is on; `image_score` in the manifest).
    """
    from edgestad.bundle import BundleError, default_bundle_path

    from .exporter import ExportError, ExportOptions, export_bundle, normalize_precisions

    try:
        bundle_path = bundle if bundle is not None else default_bundle_path()
    except BundleError as exc:
        raise click.UsageError(str(exc)) from None
    if batch > max_batch:
        raise click.BadParameter(f"--batch {batch} exceeds --max-batch {max_batch}", param_hint="--batch")
    options = ExportOptions(
        precisions=normalize_precisions(p.lower() for p in precisions), opset=opset, batch=batch,
        max_batch=max_batch, calibration_images=calibration_images,
        calibration_method=calibration_method, int8_fp16_stride=int(int8_fp16_stride),
        calibration_data=calibration_data,
        parity_images=parity_images, accuracy=accuracy, engine=engine, workspace_mb=workspace_mb,
        timing_cache=timing_cache, form="fused" if fused else form, force=force, threads=threads)
    result = _run(bundle_path, options, export_bundle, (BundleError, ExportError))
    _summary(result)


def _run(bundle_path, options, export_bundle, expected):
    """Turn every anticipated failure into a one-line click error (exit code 2)."""
    from .calibration import CalibrationError
    from .graph import GraphError
    from .parity import ParityError
    from .tensorrt_build import EngineBuildError
    from .trt_compat import TrtCompatError
    from edgestad.runner import RunnerError

    try:
        return export_bundle(bundle_path, options, log=click.echo)
    except TrtCompatError as exc:
        raise click.ClickException(f"{exc}; nothing was written to the bundle") from None
    except (GraphError, ParityError, CalibrationError, RunnerError) as exc:
        raise click.ClickException(f"{exc}; nothing was written to the bundle") from None
    except EngineBuildError as exc:
        raise click.ClickException(f"{exc}; the ONNX graphs were written, the engine was not") from None
    except expected as exc:
        raise click.ClickException(str(exc)) from None


def _summary(result) -> None:
    from .parity import format_table, parity_table

    click.echo(f"bundle {result.bundle}:")
    if result.written:
        click.echo("  wrote " + ", ".join(result.written))
    if result.reused:
        click.echo("  reused graphs: " + ", ".join(result.reused))
    rows = parity_table(result.report)
    if rows:
        click.echo(format_table(rows))
    for entry in result.engines:
        click.echo(f"  engine {entry['file']} ({entry['precision']}, {entry['gpu_name']}, "
                   f"TensorRT {entry['tensorrt_version']})")
    if result.engine_note and not result.engines:
        click.echo("  no TensorRT engine built (see note above)")
