"""`edgestad bench`: GFLOP per frame, latency and throughput of a bundle or a configuration.

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
  typed engine from the FP16 graph) where a GPU is present. A backend that cannot run here gets a
  row with ``status: "not available"`` and the reason, never a silent gap.
- Peers (``--peer efficientad-s``) and the fused form (``--fused both``) run in the same process
  under the same settings.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import numpy as np

BACKENDS = ("torch", "ort-fp32", "ort-fp16", "ort-int8", "torch-cuda", "torch-cuda-fp16",
            "tensorrt")
PEERS = ("efficientad-s",)
SCHEMA = "edgestad-bench/1"
from edgestad.contract import INPUT_NAME, OUTPUT_NAMES  # noqa: E402


# ----------------------------------------------------------------------------------- models
@dataclass
class Subject:
    """One model to time: its torch module, where it came from, and its ONNX graphs."""
    name: str
    model: object                        # torch.nn.Module mapping uint8 N×3×H×W → (map, score)
    source: str
    method: str
    method_config: dict = field(default_factory=dict)
    fused: bool = False
    onnx: dict = field(default_factory=dict)   # precision → path of an existing graph


def random_model(method: str, config: dict, seed: int = 0):
    """A method's model with random weights (cost does not depend on the weights)."""
    import torch
    from edgestad.methods import build_model
    torch.manual_seed(seed)
    return build_model(method, config).eval()


def random_uninformed_students(config: dict, seed: int = 0):
    return random_model("uninformed_students", config, seed)


def bundle_model(bundle_path: Path, dense_stride: int | None = None):
    """(model, manifest, bundle) of a bundle; ``dense_stride`` overrides the inference stride."""
    from edgestad.bundle import load_bundle
    from edgestad.methods import build_model, load_model
    import torch
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    if dense_stride is None or dense_stride == manifest["method_config"].get("dense_stride"):
        return load_model(bundle), manifest, bundle
    # The dense stride is an inference-time lever: same weights, other sampling of the same map.
    config = dict(manifest["method_config"], dense_stride=dense_stride)
    model = build_model(manifest["method"], config)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in bundle.weights().items()})
    manifest = dict(manifest, method_config=config)
    return model.eval(), manifest, None


def peer_model(name: str, input_size: tuple[int, int], seed: int = 0):
    import torch
    if name == "efficientad-s":
        from edgestad.bench.efficientad import EfficientADS
        torch.manual_seed(seed)
        try:
            return EfficientADS(input_size).eval()
        except ValueError as exc:
            raise click.UsageError(f"--peer {name}: {exc}") from None
    raise click.BadParameter(f"unknown peer {name!r}; known: {', '.join(PEERS)}",
                             param_hint="--peer")


# -------------------------------------------------------------------------------- counting
def count_gflops(model, input_size: tuple[int, int]) -> float:
    """GFLOP (2·MAC) of one frame, counted by FlopCounterMode on a meta-device copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to("meta")
    x = torch.zeros((1, 3, *input_size), dtype=torch.uint8, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return counter.get_total_flops() / 1e9


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def onnx_conv_gflops(path: Path) -> float | None:
    """2·Σ Conv MACs of one frame from the ONNX graph's inferred shapes (None if not inferable)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch_symbol = dim.dim_param
    dim.ClearField("dim_param")
    dim.dim_value = 1
    del model.graph.value_info[:]          # the exporter's shapes name the symbolic batch
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value")
                              else 1 if batch_symbol and d.dim_param == batch_symbol else None
                              for d in dims]
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:            # weights folded into Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            weights[node.output[0]] = list(node.attribute[0].t.dims)
    macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "QLinearConv", "ConvInteger"):
            continue
        w = weights.get(node.input[3] if node.op_type == "QLinearConv" else node.input[1])
        out = shapes.get(node.output[0])
        if w is None or out is None or None in out or len(out) != 4:
            return None
        macs += int(np.prod(out)) * int(np.prod(w[1:]))
    return 2 * macs / 1e9


# ------------------------------------------------------------------------------- ONNX graphs
# The graphs are made by edgestad.export (the same exporter, FP16 rule and INT8 Q/DQ rule that
# `edgestad export` writes into bundles), so the bench times what would ship. Should the exporter
# fail on a model (a peer, say), a plain torch.onnx export keeps it timeable and the report says so.
def export_onnx(model, path: Path, input_size: tuple[int, int], method: str | None = None,
                method_config: dict | None = None) -> tuple[Path, str]:
    """fp32 graph with the project's I/O contract (dynamic batch) → (path, how it was made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnx
        from edgestad.export.onnx_export import export_fp32
        fp32_modules = ()
        if method not in (None, "peer"):   # the method's fp32 region, as `edgestad export` writes it
            from edgestad.methods import get_method
            m = get_method(method)
            fp32_modules = m.fp32_modules(m.config_cls.from_dict(method_config or {}))
        onnx.save(export_fp32(model, input_size, fp32_modules=fp32_modules), str(path))
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
        from edgestad.data import list_images, read_image
        paths = list_images(folder)[:count]
        if not paths:
            raise click.BadParameter(f"no images in {folder}", param_hint="--calibration")
        imgs = np.stack([read_image(p, input_size) for p in paths]).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(imgs), f"{len(paths)} images from {folder}"
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, 3, *input_size), dtype=np.uint8),
            f"{count} random uint8 images (timing only: ranges not representative)")


# -------------------------------------------------------------------------------- runners
class NotAvailable(Exception):
    """A backend cannot run on this machine; the message says why."""


def ort_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], tuple]:
    from edgestad.onnx_session import feeds, ort_session
    session = ort_session(str(path), threads)
    return lambda batch: tuple(session.run(list(OUTPUT_NAMES), feeds(session, batch)))


def torch_runner(model) -> Callable[[np.ndarray], tuple]:
    import torch

    def run(batch):
        with torch.inference_mode():
            out = model(torch.from_numpy(batch))
        return tuple(o.numpy() for o in out)
    return run


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover - bench always has torch
        return False, "torch not installed"
    if not torch.cuda.is_available():
        return False, f"no CUDA device visible to torch {torch.__version__}"
    return True, torch.cuda.get_device_name(0)


def torch_cuda_runner(model, batch: np.ndarray, fp16: bool) -> Callable[[np.ndarray], tuple]:
    """The model captured in a CUDA graph (static input buffer); copies in and out included."""
    import torch
    ok, why = cuda_available()
    if not ok:
        raise NotAvailable(why)
    device = torch.device("cuda")
    net = copy.deepcopy(model).to(device).eval()
    static_in = torch.from_numpy(batch).to(device)
    host_in = torch.from_numpy(batch).pin_memory()
    autocast = (torch.autocast("cuda", dtype=torch.float16, cache_enabled=False) if fp16
                else contextlib.nullcontext())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode(), autocast:
        for _ in range(3):   # cuDNN autotuning and allocations happen before capture
            net(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), autocast:
        static_out = net(static_in)

    def run(new_batch):
        host_in.numpy()[...] = new_batch
        static_in.copy_(host_in, non_blocking=True)
        graph.replay()
        out = tuple(o.float().cpu().numpy() for o in static_out)  # .cpu() synchronises
        return out
    return run


def tensorrt_runner(onnx_path: Path, batch: np.ndarray) -> Callable[[np.ndarray], tuple]:
    """Strongly typed TensorRT engine of the (FP16) ONNX graph; buffers are torch CUDA tensors."""
    ok, why = cuda_available()
    if not ok:
        raise NotAvailable(why)
    try:
        import tensorrt as trt
    except ImportError:
        raise NotAvailable("tensorrt Python package not installed") from None
    import torch
    from edgestad.export.tensorrt_build import build_engine
    shape = tuple(batch.shape)
    # The engine `edgestad export` builds (strongly typed, same workspace), tuned for this batch.
    built = build_engine(Path(onnx_path).read_bytes(), "fp16", shape[1:], batch=shape[0],
                         max_batch=shape[0], log=lambda message: None)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(built.plan)
    context = engine.create_execution_context()
    context.set_input_shape(INPUT_NAME, shape)
    device_in = torch.from_numpy(batch).cuda()
    host_in = torch.from_numpy(batch).pin_memory()
    outputs = {}
    for name in OUTPUT_NAMES:
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32,
                                    device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    context.set_tensor_address(INPUT_NAME, device_in.data_ptr())
    stream = torch.cuda.Stream()

    def run(new_batch):
        host_in.numpy()[...] = new_batch
        with torch.cuda.stream(stream):
            device_in.copy_(host_in, non_blocking=True)
            context.execute_async_v3(stream.cuda_stream)
            out = tuple(outputs[n].cpu().numpy() for n in OUTPUT_NAMES)
        return out
    return run


# --------------------------------------------------------------------------------- timing
def time_round_robin(fns: dict, warmup: int, iterations: int, max_seconds: float
                     ) -> tuple[dict, dict]:
    """Latencies (s) per key, calling the functions in turn: round r calls every function once.

    Interleaving makes every model/backend of one report see the same machine load (other
    processes share this CPU), so their ratios are fair even when the load drifts. ``warmup``
    rounds first (a function whose first warm-up call exceeds a quarter of its budget skips the
    rest: it has absorbed the one-off costs), then up to ``iterations`` rounds or until
    ``max_seconds`` per function are spent (at least one round). Returns (latencies, errors).
    """
    fns = dict(fns)
    errors: dict = {}

    def call(key) -> float | None:
        start = time.perf_counter()
        try:
            fns[key]()
        except Exception as exc:   # one broken backend must not end the others' timing
            errors[key] = f"{type(exc).__name__}: {exc}"
            del fns[key]
            return None
        return time.perf_counter() - start

    warm = set()
    for _ in range(warmup):
        for key in [k for k in fns if k not in warm]:
            seconds = call(key)
            if seconds is not None and seconds > max_seconds / 4:
                warm.add(key)
    latencies: dict = {key: [] for key in fns}
    budget = max_seconds * max(1, len(fns))
    start = time.perf_counter()
    rounds = 0
    while fns and rounds < max(1, iterations):
        for key in list(fns):
            seconds = call(key)
            if seconds is not None:
                latencies[key].append(seconds)
        rounds += 1
        if time.perf_counter() - start > budget:
            break
    return {k: v for k, v in latencies.items() if k not in errors}, errors


def time_calls(fn: Callable[[], object], warmup: int, iterations: int,
               max_seconds: float) -> list[float]:
    """Latencies of one function (see ``time_round_robin``)."""
    latencies, errors = time_round_robin({0: fn}, warmup, iterations, max_seconds)
    if errors:
        raise RuntimeError(errors[0])
    return latencies[0]


def summarize(latencies: list[float], batch: int) -> dict:
    ms = np.asarray(latencies) * 1000.0
    return {"iterations": len(latencies),
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                           "mean": float(ms.mean()), "min": float(ms.min())},
            "throughput_fps": float(batch * len(ms) / (ms.sum() / 1000.0))}


# ---------------------------------------------------------------------------------- bench
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


def prepare_graphs(subject: Subject, input_size, backends, work: Path, calibration,
                   log: Callable[[str], None]) -> tuple[dict, dict]:
    """(precision → ONNX graph path or the exception that prevented it, precision → how made)."""
    graphs: dict[str, Path | Exception] = {}
    made: dict[str, str] = {}
    needs = {b.split("-")[1] for b in backends if b.startswith("ort-")}
    if "tensorrt" in backends and cuda_available()[0]:
        needs.add("fp16")
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


def make_runner(backend: str, subject: Subject, graphs: dict, batch: np.ndarray,
                threads: int | None):
    if backend == "torch":
        return torch_runner(subject.model)
    if backend.startswith("ort-"):
        graph = graphs.get(backend.split("-")[1])
        if isinstance(graph, Exception):
            raise graph
        return ort_runner(graph, threads)
    if backend in ("torch-cuda", "torch-cuda-fp16"):
        return torch_cuda_runner(subject.model, batch, fp16=backend.endswith("fp16"))
    if backend == "tensorrt":
        ok, why = cuda_available()
        if not ok:
            raise NotAvailable(why)
        graph = graphs.get("fp16")
        if isinstance(graph, Exception):
            raise graph
        return tensorrt_runner(graph, batch)
    raise ValueError(f"unknown backend {backend!r}")


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
        for i, subject in enumerate(subjects):
            rows[i] = {"backend": backend, "batch": batch_size}
            try:
                run = make_runner(backend, subject, graphs[i], batch, threads)
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
        del runners, outputs
        gc.collect()


def compare(models: list[dict]) -> dict:
    """Throughput ratios: ours vs each peer, fused vs unfused, per backend and batch."""
    def fps(entry, backend, batch):
        for r in entry["results"]:
            if r["backend"] == backend and r["batch"] == batch and r["status"] == "ok":
                return r["throughput_fps"]
        return None

    out: dict = {}
    ours = [m for m in models if m["method"] != "peer"]
    peers = [m for m in models if m["method"] == "peer"]
    keys = sorted({(r["backend"], r["batch"]) for m in models for r in m["results"]})
    for mine in ours:
        for peer in peers:
            ratios = {}
            for backend, batch in keys:
                a, b = fps(mine, backend, batch), fps(peer, backend, batch)
                if a and b:
                    ratios[f"{backend}@{batch}"] = round(a / b, 3)
            out[f"{mine['name']}/{peer['name']}"] = ratios
    unfused = [m for m in ours if not m["fused"]]
    fused = [m for m in ours if m["fused"]]
    if unfused and fused:
        ratios = {}
        for backend, batch in keys:
            a, b = fps(fused[0], backend, batch), fps(unfused[0], backend, batch)
            if a and b:
                ratios[f"{backend}@{batch}"] = round(a / b, 3)
        # The design target: fused ONNX (fp32, CPU) vs unfused torch eager.
        for batch in sorted({b for _, b in keys}):
            a, b = fps(fused[0], "ort-fp32", batch), fps(unfused[0], "torch", batch)
            if a and b:
                ratios[f"fused ort-fp32 / unfused torch @{batch}"] = round(a / b, 3)
        out["fused/unfused"] = ratios
    return out


def markdown_table(report: dict) -> str:
    lines = ["| model | GFLOP/frame | backend | batch | p50 ms | p99 ms | frames/s | n | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for m in report["models"]:
        for r in m["results"]:
            if r["status"] == "ok":
                lat = r["latency_ms"]
                cells = [f"{lat['p50']:.1f}", f"{lat['p99']:.1f}", f"{r['throughput_fps']:.2f}",
                         str(r["iterations"]), ""]
            else:
                cells = ["", "", "", "", f"{r['status']}: {r.get('note', '')}"]
            lines.append("| " + " | ".join([m["name"], f"{m['gflop_per_frame']:.1f}",
                                            r["backend"], str(r["batch"]), *cells]) + " |")
    return "\n".join(lines)


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
    if "ort-int8" in backends:
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


# ------------------------------------------------------------------------------------ CLI
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
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}",
                                 param_hint="--backends")
    return names


def build_subjects(bundle, patch_sizes, students, descriptor_dim, width, dense_stride,
                   input_size, fused, peers, seed, method="uninformed_students"
                   ) -> tuple[list[Subject], tuple[int, int]]:
    """The models to time: a bundle's, or one random-weight model per method (``method`` is a
    name or a list of names; Uninformed Students' options -p/--width/... shape its model), then
    fused forms and peers."""
    bases = []
    if bundle is not None:
        model, manifest, loaded = bundle_model(bundle, dense_stride)
        size = input_size or (manifest["input"]["height"], manifest["input"]["width"])
        onnx = {}
        if loaded is not None:          # the bundle's own exported graphs, when it has them
            from edgestad.runtime.backends import DEFAULT_ONNX_FILES
            named = (manifest.get("exports") or {}).get("onnx") or {}
            for precision, default in DEFAULT_ONNX_FILES.items():
                name = named.get(precision, default)
                if isinstance(name, str) and (loaded.path / name).is_file():
                    onnx[precision] = loaded.file(name)
        bases.append(Subject("ours", model, f"bundle {bundle}", manifest["method"],
                             manifest["method_config"], onnx=onnx))
    else:
        from edgestad.methods import get_method
        size = input_size or (256, 256)
        names = [method] if isinstance(method, str) else list(method)
        for name in names:
            label = "ours" if len(names) == 1 else name
            if name == "uninformed_students":
                config = {"patch_sizes": list(patch_sizes or (17, 33, 65)),
                          "num_students": students or 3, "descriptor_dim": descriptor_dim or 128,
                          "width": width or 128, "dense_stride": dense_stride or 1,
                          "input_size": list(size)}
                try:
                    model = random_uninformed_students(config, seed)
                except ValueError as exc:
                    raise click.UsageError(str(exc)) from None
                bases.append(Subject(label, model, "random weights", name, model.config.to_dict()))
            else:
                config = get_method(name).make_config(input_size=tuple(size)).to_dict()
                bases.append(Subject(label, random_model(name, config, seed), "random weights",
                                     name, config))
    subjects = []
    for base in bases:
        if fused in ("no", "both"):
            subjects.append(base)
        if fused in ("yes", "both"):
            from edgestad.methods import get_method
            forms = get_method(base.method).deploy_forms()
            if "fused" not in forms:
                if len(bases) == 1:
                    raise click.UsageError(f"--fused: method {base.method} has no fused form")
                if fused == "yes":
                    subjects.append(base)
                continue
            subjects.append(Subject(f"{base.name}-fused", forms["fused"](base.model), base.source,
                                    base.method, base.method_config, fused=True))
    for name in peers:
        subjects.append(Subject(name, peer_model(name, size, seed),
                                "random weights (architecture of the paper)", "peer",
                                {"input_size": list(size)}))
    return subjects, tuple(size)


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
@click.option("--backends", default=",".join(BACKENDS), show_default=True,
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
        from edgestad.bundle import atomic_write_json
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_out, report)
        click.echo(f"report written to {json_out}")
