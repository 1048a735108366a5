"""Parity and accuracy cost of the exported fp32 / fp16 / int8 graphs (ONNX Runtime, CPU).

    python studies/export_parity.py BUNDLE DATASET [--name NAME] [--calibration-images 32]

Exports a *copy* of BUNDLE with exactly the code `edgestad export` runs (the bundle itself is not
modified), using DATASET (an MVTec-layout category folder) for int8 calibration (training half of
the bundle's own train/validation split), the parity images and the test set. Writes
studies/results/export_parity_<NAME>.json (NAME defaults to the bundle folder's name) and
prints the table quoted in docs/deployment/precision.md:

- max rel diff = max|a - b| / max|b| of the anomaly maps over all parity images (b = torch model,
  or the fp32 graph in the "vs fp32 graph" column); target for fp32: <= 1e-4;
- AU-PRO (FPR <= 0.3), pixel AUROC, image AUROC on the test set, and the AU-PRO change against
  the fp32 graph; target for int8: |change| <= 0.01.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--name", default=None, help="result name (default: the bundle folder name)")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    parser.add_argument("--parity-images", type=int, default=8)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    from edgestad.bundle import load_bundle
    from edgestad.export.exporter import ExportOptions, export_bundle
    from edgestad.export.parity import format_table, parity_table

    source = load_bundle(args.bundle)  # verify before copying
    name = args.name or Path(args.bundle).resolve().name
    options = ExportOptions(precisions=("fp32", "fp16", "int8"), opset=args.opset,
                            calibration_images=args.calibration_images,
                            calibration_method=args.calibration_method,
                            calibration_data=args.dataset, parity_images=args.parity_images,
                            accuracy=True, engine=False, force=True, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="edgestad-export-parity-") as tmp:
        work = Path(tmp) / "bundle"
        shutil.copytree(source.path, work)
        t0 = time.perf_counter()
        result = export_bundle(work, options, log=print)
        seconds = time.perf_counter() - t0
        sizes = {p: (work / f).stat().st_size for p, f in
                 json.loads((work / "manifest.json").read_text())["exports"]["onnx"].items()}
    report = result.report
    rows = parity_table(report)
    out = {
        "command": "python studies/export_parity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "bundle": str(Path(args.bundle).resolve()),
        "dataset": str(Path(args.dataset).resolve()),
        "method_config": source.manifest.get("method_config"),
        "input_size": list(source.input_size),
        "settings": {"calibration_images": args.calibration_images,
                     "calibration_method": args.calibration_method,
                     "parity_images": args.parity_images, "opset": args.opset, "threads": args.threads},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": report.get("versions"),
        "table": rows,
        "graph_bytes": sizes,
        "export_seconds": round(seconds, 1),
        "graphs": report.get("graphs"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"export_parity_{name}.json"
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(format_table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
