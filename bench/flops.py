"""GFLOP per frame, counted: FlopCounterMode on the torch model, cross-checked on the ONNX graph."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np


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
