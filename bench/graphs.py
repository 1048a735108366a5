"""The ONNX graphs ``edgestad bench`` times: the bundle's own, else made here.

They are made by edgestad.export (the same exporter, FP16 rule and INT8 Q/DQ rule that
``edgestad export`` writes into bundles), so the bench times what would ship. Should the exporter
fail on a model (a peer, say), a plain torch.onnx export keeps it timeable and the report says so.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import click
import numpy as np

from edgestad.contract import INPUT_NAME, OUTPUT_NAMES
from edgestad.export.tensorrt_build import tensorrt_status
from edgestad.runner import parse_backend

TENSORRT_PRECISION = "fp16"   # the graph bench's tensorrt backend builds its engine from


def export_onnx(model, path: Path, input_size: tuple[int, int], method: str | None = None,
                method_config: dict | None = None) -> tuple[Path, str]:
    """fp32 graph with the project's I/O contract (dynamic batch) → (path, how it was made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnx
        from edgestad.export.onnx_export import export_fp32
        regions = {}
        if method not in (None, "peer"):   # the method's precision regions, as `edgestad export` writes them
            from edgestad.methods import get_method
            m = get_method(method)
            config = m.config_cls.from_dict(method_config or {})
            regions = {"fp32_modules": m.fp32_modules(config),
                       "int8_fp16_feeds": m.int8_fp16_feeds(config)}
        onnx.save(export_fp32(model, input_size, **regions), str(path))
        return path, "edgestad.export.onnx_export.export_fp32"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    import torch
    example = torch.zeros((1, 3, *input_size), dtype=torch.uint8)
    with torch.no_grad(), warnings_quiet():
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path, f"torch.onnx.export(dynamo=False) fallback ({reason})"


@contextlib.contextmanager
def warnings_quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def convert_fp16(src: Path, dst: Path) -> tuple[Path, str]:
    """FP16 convolutions, FP32 I/O and scoring (edgestad.export's rule)."""
    import onnx
    from edgestad.export.precision import to_fp16
    onnx.save(to_fp16(onnx.load(str(src)))[0], str(dst))
    return dst, "edgestad.export.precision.to_fp16"


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray) -> tuple[Path, str]:
    """Static QDQ INT8 of the convolutions (edgestad.export's rule), calibrated on ``calibration``."""
    import onnx
    from edgestad.export.onnx_export import DEFAULT_INT8_FP16_STRIDE
    from edgestad.export.precision import to_int8
    onnx.save(to_int8(onnx.load(str(src)), calibration, fp16_stride=DEFAULT_INT8_FP16_STRIDE)[0],
              str(dst))
    return dst, "edgestad.export.precision.to_int8"


def calibration_images(folder: Path | None, input_size: tuple[int, int], count: int,
                       seed: int) -> tuple[np.ndarray, str]:
    """uint8 N×3×H×W calibration batch: good images from ``folder`` or random noise."""
    if folder is not None:
        from edgestad.images import list_images, read_image
        paths = list_images(folder)[:count]
        if not paths:
            raise click.BadParameter(f"no images in {folder}", param_hint="--calibration")
        imgs = np.stack([read_image(p, input_size) for p in paths]).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(imgs), f"{len(paths)} images from {folder}"
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, 3, *input_size), dtype=np.uint8),
            f"{count} random uint8 images (timing only: ranges not representative)")


def prepare_graphs(subject, input_size, backends, work: Path, calibration,
                   log: Callable[[str], None]) -> tuple[dict, dict]:
    """(precision → ONNX graph path or the exception that prevented it, precision → how made)."""
    graphs: dict[str, Path | Exception] = {}
    made: dict[str, str] = {}
    needs = set()
    for backend in backends:
        base, precision = parse_backend(backend)
        if base == "onnxruntime":
            needs.add(precision or "fp32")
        elif base == "tensorrt" and tensorrt_status()[0]:
            needs.add(precision or TENSORRT_PRECISION)
    if needs:
        needs.add("fp32")
    stem = work / subject.name
    for precision in ("fp32", "fp16", "int8"):
        if precision not in needs:
            continue
        if precision in subject.onnx:
            graphs[precision] = Path(subject.onnx[precision])
            made[precision] = f"bundle file {Path(subject.onnx[precision]).name}"
            continue
        try:
            if precision == "fp32":
                log(f"[{subject.name}] exporting ONNX fp32")
                graphs[precision], made[precision] = export_onnx(
                    subject.model, stem.with_suffix(".onnx"), input_size, subject.method,
                    subject.method_config)
            elif isinstance(graphs.get("fp32"), Path):
                out = stem.with_suffix(f".{precision}.onnx")
                log(f"[{subject.name}] converting ONNX to {precision}")
                graphs[precision], made[precision] = (
                    convert_fp16(graphs["fp32"], out) if precision == "fp16"
                    else quantize_int8(graphs["fp32"], out, calibration))
            else:
                graphs[precision] = RuntimeError("no fp32 graph to convert")
        except Exception as exc:   # report the failure in the table, time the rest
            graphs[precision] = exc
    return graphs, made
