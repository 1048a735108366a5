"""`edgestad bench`: the command. What it times is in subjects.py, how in run.py (backends.py,
graphs.py, flops.py, timing.py), what it writes in report.py."""
from __future__ import annotations

from pathlib import Path

import click

from edgestad.runner import BENCH_BACKENDS, canonical_backend

from .report import markdown_table
from .run import run_bench
from .subjects import PEERS, build_subjects

def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise click.BadParameter(f"expected H, HxW or H,W; got {value!r}",
                                 param_hint="--input-size") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise click.BadParameter(f"expected H, HxW or H,W; got {value!r}",
                                 param_hint="--input-size")
    return sizes[0], sizes[1]


def _parse_backends(value: str) -> list[str]:
    """Comma-separated names (any spelling of the vocabulary, e.g. onnxruntime-fp16 for ort-fp16),
    each given as the bench writes it in its report."""
    names, unknown = [], []
    for name in (v.strip() for v in value.split(",") if v.strip()):
        try:
            names.append(canonical_backend(name, BENCH_BACKENDS))
        except ValueError:
            unknown.append(name)
    if unknown or not names:
        raise click.BadParameter(f"unknown backend(s) {unknown}; choose from {', '.join(BENCH_BACKENDS)}",
                                 param_hint="--backends")
    return names


@click.command("bench")
@click.argument("bundle", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--method", "methods", multiple=True,
              help="Method(s) of random-weight models (repeat to time several in one run; default: "
              "uninformed_students when -p/--width/... are given, else stfpm).")
@click.option("-p", "--patch-size", "patch_sizes", type=int, multiple=True,
              help="uninformed_students: scales p of a random-weight configuration (repeat; default 17 33 65).")
@click.option("--students", type=int, help="Students M per scale (default 3).")
@click.option("--descriptor-dim", type=int, help="Descriptor dimension d (default 128).")
@click.option("--width", type=int, help="Conv channel width (default 128).")
@click.option("--dense-stride", type=int,
              help="Dense stride (1, 2, 4, 8); also overrides a bundle's inference stride.")
@click.option("--input-size", help="H or HxW (default: the bundle's, else 256).")
@click.option("--fused", type=click.Choice(["no", "yes", "both"]), default="no",
              show_default=True, help="Time the fused teacher+students form too.")
@click.option("--batch", "batches", type=int, multiple=True,
              help="Batch sizes (repeat; default 1 and 8).")
@click.option("--backends", default=",".join(BENCH_BACKENDS), show_default=True,
              help="Comma-separated backends.")
@click.option("--peer", "peers", type=click.Choice(PEERS), multiple=True,
              help="Also time a peer method (random weights) in the same run.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--iterations", type=int, default=50, show_default=True,
              help="Measured calls per backend and batch (at most).")
@click.option("--max-seconds", type=float, default=20.0, show_default=True,
              help="Time budget per backend and batch (at least one call is measured).")
@click.option("--threads", type=int, help="CPU threads for torch and ONNX Runtime "
              "(default: the libraries' defaults).")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of good images for INT8 calibration (default: random images).")
@click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the exported/converted ONNX graphs here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report as JSON.")
def bench_command(bundle, methods, patch_sizes, students, descriptor_dim, width, dense_stride, input_size,
                  fused, batches, backends, peers, warmup, iterations, max_seconds, threads,
                  calibration, onnx_dir, seed, json_out):
    """GFLOP/frame, latency (p50/p99) and throughput of BUNDLE, or of a random-weight
    configuration (-p/--width/--dense-stride/...) when no BUNDLE is given."""
    if bundle is not None and (patch_sizes or students or descriptor_dim or width):
        raise click.UsageError("-p/--students/--descriptor-dim/--width describe a random-weight "
                               "configuration; drop them or the BUNDLE (--dense-stride may "
                               "override a bundle's stride)")
    us_options = bool(patch_sizes or students or descriptor_dim or width or dense_stride)
    method = list(methods) or ["uninformed_students" if us_options else "stfpm"]
    if bundle is None and us_options and "uninformed_students" not in method:
        raise click.UsageError("-p/--students/--descriptor-dim/--width/--dense-stride describe an "
                               "uninformed_students configuration")
    subjects, size = build_subjects(bundle, patch_sizes, students, descriptor_dim, width,
                                    dense_stride, _parse_size(input_size), fused, peers, seed,
                                    method)
    report = run_bench(subjects, size, _parse_backends(backends), list(batches or (1, 8)),
                       warmup, iterations, max_seconds, threads, calibration, work_dir=onnx_dir,
                       seed=seed, log=lambda s: click.echo(s, err=True))
    click.echo(markdown_table(report))
    for name, ratios in report["comparisons"].items():
        if ratios:
            click.echo(f"throughput ratio {name}: " +
                       ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if json_out:
        from edgestad.files import atomic_write_json
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_out, report)
        click.echo(f"report written to {json_out}")
