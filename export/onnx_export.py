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

from .graph import (BATCH_DIM, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAMES, VALID_BOX_NAME, GraphError,
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


FP32_NODES_KEY = "edgestad.fp32_nodes"
INT8_FP16_KEY = "edgestad.int8_fp16"   # {"<stride>": [nodes], ...}: the backbones' early layers
INT8_FEEDS_KEY = "edgestad.int8_fp16_feeds"   # [nodes]: backbone layers feeding Method.int8_fp16_feeds
INT8_FP16_STRIDES = (2, 4, 8)          # the choices of `--int8-fp16-stride` (besides 0)
ALL_STAGES = 32                        # the deepest stride a backbone pyramid has
DEFAULT_INT8_FP16_STRIDE = 4           # `edgestad export --int8-fp16-stride` and bench


def nodes_in_modules(proto: onnx.ModelProto, modules) -> list[str]:
    """Names of the nodes the exporter attributes to any of the module paths ``modules`` (from
    torch.onnx's ``pkg.torch.onnx.name_scopes`` node metadata)."""
    import ast
    wanted = tuple(m for m in modules if m)
    if not wanted:
        return []
    found = []
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.name_scopes":
                continue
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                continue
            if any(sc == m or sc.startswith(m + ".") for sc in scopes for m in wanted):
                found.append(node.name)
    return found


def early_stage_modules(model, stride: int) -> list[str]:
    """Module paths of every pretrained-backbone pyramid's layers at strides ≤ ``stride`` (stem and
    first stages of each teacher and student), found by type, so no method lists them."""
    from edgestad.methods.common.backbones import FeaturePyramid
    return [f"{path}.{child}" for path, module in model.named_modules()
            if isinstance(module, FeaturePyramid) for child in module.modules_up_to_stride(stride)]


def _backbone_layers_feeding(proto: onnx.ModelProto, model, modules) -> set[str]:
    """Names of the pretrained-backbone layers (any stride) the nodes of ``modules`` depend on."""
    from .graph import ancestors, producers
    if not modules:
        return set()
    targets = set(nodes_in_modules(proto, modules))
    if not targets:
        raise GraphError(f"the method declares int8-sensitive modules {list(modules)} but no "
                         "exported node belongs to them")
    backbone = set(nodes_in_modules(proto, early_stage_modules(model, ALL_STAGES)))
    produced_by, cache = producers(proto), {}
    upstream: set[str] = set()
    for node in proto.graph.node:
        if node.name in targets:
            upstream |= ancestors(node, produced_by, cache)
    return upstream & backbone


def export_fp32(model, input_size: tuple[int, int], opset: int = DEFAULT_OPSET,
                example_batch: int = 2, valid_box: bool = False,
                fp32_modules=(), int8_fp16_feeds=()) -> onnx.ModelProto:
    """The fp32 ONNX graph of ``model`` (images uint8 N x 3 x H x W [, valid_box N x 4] -> map,
    score).

    The example batch is 2, not 1: torch.export specialises a dimension whose example size is 1.
    The graph's metadata records the fp32 region the method declares and, for each stride in
    ``INT8_FP16_STRIDES``, the backbone layers at strides ≤ it: the region ``precision.to_int8``
    keeps in fp16 for ``--int8-fp16-stride`` (so changing that option touches only the int8 graph),
    and the backbone layers that feed the modules ``int8_fp16_feeds`` (``Method.int8_fp16_feeds``),
    which the int8 graph keeps in fp16 too.
    """
    import torch

    height, width = (int(v) for v in input_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (example_batch, 3, height, width), dtype=torch.uint8,
                            generator=generator)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    model = model.eval().float()
    args, names, dynamic = (example,), [INPUT_NAME], ({0: batch},)
    if valid_box:
        boxes = torch.tensor([[0.0, 0.0, height, width]] * example_batch)
        args, names, dynamic = (example, boxes), [INPUT_NAME, VALID_BOX_NAME], ({0: batch}, {0: batch})
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                model, args, dynamo=True, input_names=names,
                output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic,
                opset_version=EXPORTER_OPSET, optimize=True, verbose=False, external_data=False)
        except Exception as exc:  # the exporter raises many types; keep the cause chained
            raise GraphError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    # The method's fp32 region (Method.fp32_modules), found while the exporter's scope metadata
    # is still there; finalize() strips it. fp16/int8 conversion reads the list back.
    forced = nodes_in_modules(proto, fp32_modules)
    early = {str(s): nodes_in_modules(proto, early_stage_modules(model, s)) for s in INT8_FP16_STRIDES}
    if fp32_modules and not forced:
        raise GraphError(f"the method declares fp32 modules {list(fp32_modules)} but no exported "
                         "node belongs to them")
    feeds = _backbone_layers_feeding(proto, model, int8_fp16_feeds)
    proto = finalize(convert_opset(proto, opset))
    from .graph import set_metadata
    if forced:
        set_metadata(proto, {FP32_NODES_KEY: sorted(forced)})
    set_metadata(proto, {INT8_FP16_KEY: {s: sorted(set(nodes) - set(forced))
                                         for s, nodes in early.items()}})
    if feeds:
        set_metadata(proto, {INT8_FEEDS_KEY: sorted(feeds - set(forced))})
    check_io_contract(proto, (height, width), valid_box)
    return proto
