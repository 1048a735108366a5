"""torch module -> fp32 ONNX graph (the only place export touches torch).

Uses torch's ``torch.export``-based ONNX exporter (``dynamo=True``): it specialises every shape to
the bundle's static input size and keeps only the batch symbolic, so the graph has constant Slice
bounds and Pad amounts and no Shape/Gather arithmetic (the legacy TorchScript exporter traces
``x.shape`` into dozens of shape-computation nodes and leaves the output's spatial size unknown).
That exporter writes opset 18; ``graph.convert_opset`` takes it to the requested opset.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import onnx

from .graph import (BATCH_DIM, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAMES, GraphError,
                    check_io_contract, convert_opset, finalize)

EXPORTER_OPSET = 18


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs one warning per missing torchvision op and FutureWarnings from
    torch.export internals; none concern this model, so keep the CLI output readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export",
                                                     "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_fp32(model, input_size: tuple[int, int], opset: int = DEFAULT_OPSET,
                example_batch: int = 2) -> onnx.ModelProto:
    """The fp32 ONNX graph of ``model`` (images uint8 N x 3 x H x W -> map, score).

    The example batch is 2, not 1: torch.export specialises a dimension whose example size is 1.
    """
    import torch

    height, width = (int(v) for v in input_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (example_batch, 3, height, width), dtype=torch.uint8,
                            generator=generator)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    model = model.eval().float()
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},),
                opset_version=EXPORTER_OPSET, optimize=True, verbose=False, external_data=False)
        except Exception as exc:  # the exporter raises many types; keep the cause chained
            raise GraphError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    proto = finalize(convert_opset(proto, opset))
    check_io_contract(proto, (height, width))
    return proto
