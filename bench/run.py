"""The bench harness: GFLOP per frame, latency and throughput of every subject on every backend.

One harness for every model and backend, so numbers in one report are comparable:
- GFLOP/frame is counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` on the torch
  model (run on the meta device, so even the 1.8 TFLOP exact model costs nothing), in the
  GFLOP = 2·MAC convention; convolutions and matmuls only (elementwise ops are < 1 % here).
  It is cross-checked by summing Conv MACs over the exported ONNX graph's inferred shapes.
- Each backend is timed on the same random uint8 batch: ``warmup`` calls, then up to
  ``iterations`` calls or ``max_seconds``, whichever comes first (at least one). For one backend
  and batch size, all models (ours, fused, peers) are called in turn (round robin), so a load
  change on this shared machine hits them alike. Latency is the wall time of one synchronous call (host input → host
  outputs, copies included), p50/p99 over the measured calls; throughput = frames / measured
  seconds of that model/backend.
- Backends: ``torch`` (eager, CPU), ``ort-fp32`` / ``ort-fp16`` / ``ort-int8`` (ONNX Runtime, CPU
  execution provider; the bundle's exported graphs when it has them, else exported / converted /
  quantised here), ``torch-cuda`` / ``torch-cuda-fp16`` (CUDA graphs) and ``tensorrt`` (strongly
  typed engine from the FP16 graph, run by TrtRunner) where tensorrt, pycuda and a GPU are present. A backend that cannot run here gets a
  row with ``status: "not available"`` and the reason, never a silent gap.
- Peers (``--peer efficientad-s``) and the fused form (``--fused both``) run in the same process
  under the same settings.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgestad.runner import parse_backend

from .backends import NotAvailable, cuda_available, open_backend
from .flops import count_gflops, count_params, onnx_conv_gflops
from .graphs import calibration_images, prepare_graphs
from .report import SCHEMA, compare
from .subjects import Subject
from .timing import summarize, time_round_robin


def machine_info(threads: int | None) -> dict:
    import torch
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ok, gpu = cuda_available()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "gpu": gpu if ok else None,
            # Other processes compete for the CPU; the load average says how much.
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def describe_subject(subject: Subject, input_size, backends, work: Path, calibration,
                     log: Callable[[str], None]) -> tuple[dict, dict]:
    """(report entry with counts and graphs, precision → graph) of one subject."""
    entry = {"name": subject.name, "source": subject.source, "method": subject.method,
             "method_config": subject.method_config, "fused": subject.fused,
             "params": count_params(subject.model),
             "gflop_per_frame": round(count_gflops(subject.model, input_size), 3),
             "gflop_per_frame_onnx_conv": None, "graphs": {}, "results": []}
    graphs, made = prepare_graphs(subject, input_size, backends, work, calibration, log)
    for precision, graph in graphs.items():
        entry["graphs"][precision] = ({"file": graph.name, "made_by": made[precision]}
                                      if isinstance(graph, Path) else
                                      {"failed": f"{type(graph).__name__}: {graph}"})
    if isinstance(graphs.get("fp32"), Path):
        try:
            gflop = onnx_conv_gflops(graphs["fp32"])
            entry["gflop_per_frame_onnx_conv"] = None if gflop is None else round(gflop, 3)
        except Exception as exc:
            entry["gflop_onnx_note"] = f"not counted: {exc}"
    return entry, graphs


def time_batch(subjects: list[Subject], entries: list[dict], graphs: list[dict], backends,
               batch: np.ndarray, warmup, iterations, max_seconds, threads,
               log: Callable[[str], None]) -> None:
    """Time every (subject, backend) on one batch; append rows to the entries.

    Per backend, all subjects are timed interleaved (ours, fused, peers see the same load); the
    backend's sessions are then released before the next backend's are made, which bounds memory
    (an ONNX Runtime session keeps its peak activations, GBs at batch 8 for a dense model).
    """
    import gc
    batch_size = len(batch)
    references: dict = {}
    for backend in backends:
        rows: dict = {}
        runners: dict = {}
        outputs: dict = {}
        stack = contextlib.ExitStack()
        for i, subject in enumerate(subjects):
            rows[i] = {"backend": backend, "batch": batch_size}
            try:
                run = open_backend(backend, subject, graphs[i], batch, threads, stack)
                outputs[i] = run(batch)
            except NotAvailable as exc:
                rows[i].update(status="not available", note=str(exc))
                continue
            except Exception as exc:
                rows[i].update(status="failed", note=f"{type(exc).__name__}: {exc}")
                continue
            runners[i] = (lambda run=run: run(batch))
        if runners:
            log(f"batch {batch_size}, {backend}: timing {len(runners)} model(s), interleaved")
        latencies, errors = time_round_robin(runners, warmup, iterations, max_seconds)
        for i, row in rows.items():
            if i in errors:
                row.update(status="failed", note=errors[i])
            elif i in latencies:
                row.update(status="ok", **summarize(latencies[i], batch_size))
                if backend == "torch":
                    references[i] = outputs[i]
                elif i in references:
                    # A sanity check, not a parity test: random weights, random images.
                    row["image_score_max_abs_diff_vs_torch"] = float(np.abs(
                        np.asarray(outputs[i][1], np.float64) - references[i][1]).max())
            entries[i]["results"].append(row)
        stack.close()
        del runners, outputs
        gc.collect()


def run_bench(subjects: list[Subject], input_size, backends, batches, warmup=3, iterations=50,
              max_seconds=20.0, threads=None, calibration_dir=None, calibration_count=4,
              work_dir: Path | None = None, seed=0, log: Callable[[str], None] = lambda s: None
              ) -> dict:
    """Time every subject on every backend and batch size; returns the JSON-ready report."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info(threads)
    calibration, calibration_note = (None, None)
    if any(parse_backend(b) == ("onnxruntime", "int8") for b in backends):
        calibration, calibration_note = calibration_images(calibration_dir, input_size,
                                                           calibration_count, seed)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgestad-bench-")))
        else:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
        described = [describe_subject(s, input_size, backends, work, calibration, log)
                     for s in subjects]
        models = [entry for entry, _ in described]
        graphs = [g for _, g in described]
        rng = np.random.default_rng(seed)
        for batch_size in batches:
            batch = rng.integers(0, 256, (batch_size, 3, *input_size), dtype=np.uint8)
            time_batch(subjects, models, graphs, backends, batch, warmup, iterations,
                       max_seconds, threads, log)
    machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {"schema": SCHEMA, "machine": machine,
            "settings": {"input_size": list(input_size), "batches": list(batches),
                         "backends": list(backends), "warmup": warmup, "iterations": iterations,
                         "max_seconds": max_seconds, "int8_calibration": calibration_note,
                         "gflop_convention": "2 x MACs of Conv/MatMul, one frame"},
            "models": models, "comparisons": compare(models)}
