"""What each ``edgestad bench`` backend runs, behind one call: ``open_backend`` -> batch -> outputs.

``torch``: the torch model through edgestad.torch_loop; ``ort-<precision>``: the graph through
edgestad.runner's OrtRunner (CPU provider); ``tensorrt``: an engine built by export's builder
(strongly typed, from the FP16 graph) run by TrtRunner; ``torch-cuda[-fp16]``: the model captured
in a CUDA graph. Latency includes host -> device -> host copies where there is a device.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import numpy as np

from edgestad.runner import OrtRunner, TrtRunner, parse_backend

from .graphs import TENSORRT_PRECISION, tensorrt_status


class NotAvailable(Exception):
    """A backend cannot run on this machine; the message says why."""


def open_backend(backend: str, subject, graphs: dict, batch: np.ndarray, threads: int | None,
                 stack: contextlib.ExitStack) -> Callable[[np.ndarray], tuple]:
    """The function that runs ``subject`` on a batch with ``backend``; what it holds is released
    when ``stack`` closes."""
    base, precision = parse_backend(backend)
    if base == "torch":
        from edgestad.torch_loop import run_model
        return lambda images: run_model(subject.model, images, batch_size=len(images))
    if base == "torch-cuda":
        return torch_cuda_runner(subject.model, batch, fp16=precision == "fp16")
    if base == "onnxruntime":
        return stack.enter_context(OrtRunner(_graph(graphs, precision or "fp32"), threads=threads)).infer
    if base == "tensorrt":
        ok, why = tensorrt_status()
        if not ok:
            raise NotAvailable(why)
        precision = precision or TENSORRT_PRECISION
        return stack.enter_context(tensorrt_runner(_graph(graphs, precision), precision,
                                                   batch.shape)).infer
    raise ValueError(f"bench cannot time backend {backend!r}")


def _graph(graphs: dict, precision: str) -> Path:
    graph = graphs.get(precision)
    if isinstance(graph, Exception):
        raise graph
    if graph is None:
        raise NotAvailable(f"no {precision} graph")
    return graph


def tensorrt_runner(onnx_path: Path, precision: str, shape: tuple[int, ...]) -> TrtRunner:
    """The engine ``edgestad export`` builds (strongly typed, same workspace), tuned for the
    batch shape N x 3 x H x W."""
    from edgestad.export.tensorrt_build import build_engine
    built = build_engine(Path(onnx_path).read_bytes(), precision, shape[1:], batch=shape[0],
                         max_batch=shape[0], log=lambda message: None)
    return TrtRunner(built.plan, label=f"engine of {Path(onnx_path).name}")


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
