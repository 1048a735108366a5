"""Speed tables of docs/results/performance.md, each one `edgestad bench` run with fixed options.

    python studies/speed.py edge      # edge default vs EfficientAD-S, fused vs unfused, all backends
    python studies/speed.py fusion    # fused vs unfused at multi-scale s2 (torch eager, ORT fp32)
    python studies/speed.py gpu       # on an NVIDIA GPU: CUDA graphs + TensorRT, batch 1 and 16
    python studies/speed.py edge --threads 2 -- --max-seconds 5   # extra bench options after --

Each preset writes studies/results/speed_<preset>.json (the bench report) and .md (its table).
Random weights: latency does not depend on them. 256×256 input throughout.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results"
# The edge default recommended in docs/results/performance.md: p = 65 alone, dense stride 4, width 64 (see
# results/frontier_bottle.md and frontier_magnetic_tile.md for why).
EDGE = ["-p", "65", "--dense-stride", "4", "--width", "64"]
CPU_BACKENDS = "torch,ort-fp32,ort-fp16,ort-int8"
GPU_BACKENDS = "torch-cuda,torch-cuda-fp16,tensorrt,ort-fp32"
PRESETS = {
    "edge": [*EDGE, "--fused", "both", "--peer", "efficientad-s", "--batch", "1", "--batch", "8",
             "--backends", CPU_BACKENDS + ",torch-cuda,tensorrt", "--iterations", "10",
             "--max-seconds", "10"],
    "fusion": ["-p", "17", "-p", "33", "-p", "65", "--dense-stride", "2", "--fused", "both",
               "--batch", "1", "--backends", "torch,ort-fp32", "--iterations", "3",
               "--max-seconds", "20"],
    "gpu": [*EDGE, "--fused", "both", "--peer", "efficientad-s", "--batch", "1", "--batch", "16",
            "--backends", GPU_BACKENDS, "--iterations", "200", "--max-seconds", "20"],
    "gpu-exact": ["-p", "17", "-p", "33", "-p", "65", "--dense-stride", "1", "--fused", "both",
                  "--batch", "1", "--batch", "16", "--backends", GPU_BACKENDS,
                  "--iterations", "50", "--max-seconds", "30"],
}


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("preset", type=click.Choice(sorted(PRESETS)))
@click.option("--threads", type=int, default=None, help="CPU threads (torch and ORT).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def main(preset, threads, out, extra):
    from edgestad.bench.cli import bench_command
    from edgestad.bench.report import markdown_table
    out.mkdir(parents=True, exist_ok=True)
    json_file = out / f"speed_{preset}.json"
    args = [*PRESETS[preset], *(["--threads", str(threads)] if threads else []), *extra,
            "--json", str(json_file)]
    click.echo("edgestad bench " + " ".join(args), err=True)
    bench_command.main(args, standalone_mode=False)
    report = json.loads(json_file.read_text())
    report["command"] = "edgestad bench " + " ".join(args)
    json_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = [f"`{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical "
             f"CPUs, threads={report['machine']['threads']}, GPU: {report['machine']['gpu']}, "
             f"{report['machine']['date']}", "", markdown_table(report), ""]
    for name, ratios in report["comparisons"].items():
        if ratios:
            lines.append(f"- throughput ratio {name}: " +
                         ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
    (out / f"speed_{preset}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
