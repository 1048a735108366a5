"""Will TensorRT's ONNX parser take this graph? Checked here, before anything is written.

TensorRT cannot be installed on the development machine, so export proves compatibility
statically: every node is checked against the operators, attributes and constant-input
restrictions of onnx-tensorrt's ``docs/operators.md`` (TensorRT 10.x support matrix), then the
graph goes through ``onnx.checker`` (full check) and strict shape inference. Export refuses a
graph that fails, naming each offending node and operator.

The allowlist is deliberately narrower than all of TensorRT: control flow (Loop/If/Scan),
data-dependent shapes (NonZero, NonMaxSuppression) and random ops are refused because a
deployed anomaly graph must be a fixed, deterministic dataflow with static spatial shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import MIN_OPSET

# Newest opset every TensorRT 10 release parses (10.0 documents "opset 9 to opset 20"; later 10.x
# releases go further). Graphs here are exported at 17 (default) or 18.
MAX_OPSET = 20

# Operators marked supported ("Y") in onnx-tensorrt's operators.md for TensorRT 10.x, minus the
# ones refused on purpose below.
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
LRN LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
Resize Round ScaledTanh Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())

REFUSED_OPS = {
    "Loop": "control flow: the deployed graph must be a fixed dataflow (unroll the loop in the model)",
    "If": "control flow: the deployed graph must be a fixed dataflow (resolve the branch at export)",
    "Scan": "control flow: the deployed graph must be a fixed dataflow",
    "NonZero": "data-dependent output shape",
    "NonMaxSuppression": "data-dependent output shape",
    "RandomNormal": "non-deterministic", "RandomNormalLike": "non-deterministic",
    "RandomUniform": "non-deterministic", "RandomUniformLike": "non-deterministic",
}

_POOLS_WITHOUT_DILATION = {"MaxPool", "AveragePool", "LpPool"}
_REDUCE_OPS = {op for op in TENSORRT_OPS if op.startswith("Reduce")}
_PAD_MODES = {"constant", "reflect", "edge"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_COORD_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                       "align_corners"}
_RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
# Tensor element types TensorRT has; UINT8 only as a network input/output.
_TRT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
              TensorProto.INT64, TensorProto.INT8, TensorProto.BOOL, TensorProto.UINT8}


@dataclass
class Problem:
    message: str
    node: str | None = None
    op: str | None = None

    def __str__(self) -> str:
        if self.node is not None:
            return f"node '{self.node}' ({self.op}): {self.message}"
        return self.message


@dataclass
class CompatReport:
    problems: list[Problem] = field(default_factory=list)
    checked_nodes: int = 0
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {"ok": self.ok, "checked_nodes": self.checked_nodes, "opset": self.opset,
                "problems": [str(p) for p in self.problems], "max_opset": MAX_OPSET,
                "rules": "onnx-tensorrt operators.md (TensorRT 10.x) allowlist + onnx.checker "
                         "full_check + strict shape inference"}


class TrtCompatError(ValueError):
    """The graph uses something TensorRT cannot parse; the message lists every problem."""

    def __init__(self, what: str, problems: list[Problem]):
        self.problems = problems
        lines = "\n  - ".join(str(p) for p in problems)
        super().__init__(f"{what} is not TensorRT-compatible ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}):\n  - {lines}")


ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]


def check_tensorrt_compatible(model: ModelLike) -> CompatReport:
    """Check a graph (ModelProto or path) and return every problem found (never raises on them)."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        model = onnx.load(str(path))
    report = CompatReport()
    problems = report.problems

    # --- opsets and domains -------------------------------------------------------------------
    opset = None
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            opset = int(entry.version)
    report.opset = opset
    if opset is None:
        problems.append(Problem("graph imports no default-domain (ai.onnx) opset"))
    elif opset < MIN_OPSET:
        problems.append(Problem(f"opset {opset} is below the required minimum {MIN_OPSET}"))
    elif opset > MAX_OPSET:
        problems.append(Problem(f"opset {opset} is above {MAX_OPSET}, the newest every TensorRT 10 "
                                "release parses"))
    if len(model.functions):
        problems.append(Problem(f"graph defines {len(model.functions)} model-local function(s) "
                                f"({', '.join(f.name for f in model.functions)}); inline them"))

    graph = model.graph
    constants = _constant_names(graph)
    init_values = {i.name: i for i in graph.initializer}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    graph_io = {v.name for v in graph.input} | {v.name for v in graph.output}
    dq_of_constant = {n.output[0] for n in graph.node
                      if n.op_type == "DequantizeLinear" and n.input and n.input[0] in constants}

    # --- graph inputs / outputs: only the batch dimension may be symbolic -----------------------
    for kind, values in (("input", [v for v in graph.input if v.name not in init_values]),
                         ("output", list(graph.output))):
        for v in values:
            tt = v.type.tensor_type
            if not tt.HasField("shape"):
                problems.append(Problem(f"graph {kind} '{v.name}' has no shape (TensorRT needs "
                                        "static spatial dimensions)"))
                continue
            for axis, dim in enumerate(tt.shape.dim):
                if axis == 0:
                    continue
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    label = dim.dim_param or "?"
                    problems.append(Problem(f"graph {kind} '{v.name}' has a dynamic dimension {axis} "
                                            f"('{label}'); only the batch dimension 0 may be dynamic"))
            if tt.elem_type not in _TRT_TYPES:
                problems.append(Problem(f"graph {kind} '{v.name}' has type "
                                        f"{TensorProto.DataType.Name(tt.elem_type)}, which TensorRT lacks"))

    # --- every node ---------------------------------------------------------------------------
    for index, node in enumerate(graph.node):
        report.checked_nodes += 1
        name = node.name or f"#{index}"

        def bad(message: str, _name=name, _op=node.op_type) -> None:
            problems.append(Problem(message, _name, _op))

        if node.domain not in ("", "ai.onnx"):
            bad(f"custom domain '{node.domain}' (TensorRT parses only standard ONNX ops without plugins)")
            continue
        if node.op_type in REFUSED_OPS:
            bad(f"refused: {REFUSED_OPS[node.op_type]}")
            continue
        if node.op_type not in TENSORRT_OPS:
            bad("operator not supported by TensorRT's ONNX parser (not in the operators.md allowlist)")
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        _check_node(node, attrs, constants, init_values, const_nodes, dq_of_constant, graph_io, bad)

    # --- whole-graph validity -----------------------------------------------------------------
    try:
        if path is not None and path.stat().st_size > (1 << 31) - 1:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError / InferenceError
        problems.append(Problem(f"onnx.checker (full_check) failed: {_first_line(exc)}"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                     data_prop=True)
    except Exception as exc:
        problems.append(Problem(f"strict shape inference failed: {_first_line(exc)}"))
    else:
        _check_value_types(inferred, graph_io, problems)
    return report


def assert_tensorrt_compatible(model: ModelLike, what: str | None = None) -> CompatReport:
    """Raise TrtCompatError listing every problem, else return the (clean) report."""
    report = check_tensorrt_compatible(model)
    if not report.ok:
        label = what or (str(model) if not isinstance(model, onnx.ModelProto) else "graph")
        raise TrtCompatError(label, report.problems)
    return report


# ---------------------------------------------------------------------------------- internals


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return names


def _constant_array(name, init_values, const_nodes):
    if name in init_values:
        return numpy_helper.to_array(init_values[name])
    node = const_nodes.get(name)
    if node is not None:
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _check_node(node, attrs, constants, init_values, const_nodes, dq_of_constant, graph_io, bad) -> None:
    op = node.op_type
    inputs = list(node.input)

    def constant_input(index: int, label: str) -> None:
        if len(inputs) > index and inputs[index] and inputs[index] not in constants:
            bad(f"input '{label}' ({inputs[index]}) must be a constant (initializer or Constant node)")

    if op in _POOLS_WITHOUT_DILATION:
        dilations = attrs.get("dilations")
        if dilations and any(int(d) != 1 for d in dilations):
            bad(f"dilations {list(dilations)}: TensorRT has no dilated pooling (write it as the "
                "maximum of shifted slices, see edgestad.models.patchnet.shifted_max_pool)")
        kernel = attrs.get("kernel_shape") or []
        if len(kernel) not in (2, 3):
            bad(f"kernel_shape {list(kernel)}: only 2D or 3D pooling is supported")
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            bad("the Indices output is not supported")
    elif op in ("Conv", "ConvTranspose"):
        kernel = attrs.get("kernel_shape")
        if kernel is not None and len(kernel) not in (2, 3):
            bad(f"kernel_shape {list(kernel)}: only 2D or 3D convolutions are supported")
        if len(inputs) > 1 and inputs[1] not in constants and inputs[1] not in dq_of_constant:
            bad(f"weights '{inputs[1]}' must be an initializer (or DequantizeLinear of one)")
    elif op == "Pad":
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode not in _PAD_MODES:
            bad(f"pad mode '{mode}' not supported (use one of {sorted(_PAD_MODES)})")
        constant_input(1, "pads")
        constant_input(3, "axes")
    elif op in _REDUCE_OPS:
        constant_input(1, "axes")
    elif op == "Slice":
        for i, label in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")):
            constant_input(i, label)
    elif op in ("Squeeze", "Unsqueeze"):
        constant_input(1, "axes")
    elif op == "Resize":
        mode = _text(attrs.get("mode", b"nearest"))
        coord = _text(attrs.get("coordinate_transformation_mode", b"half_pixel"))
        nearest = _text(attrs.get("nearest_mode", b"round_prefer_floor"))
        if mode not in _RESIZE_MODES:
            bad(f"resize mode '{mode}' not supported (nearest or linear)")
        if coord not in _RESIZE_COORD_MODES:
            bad(f"coordinate_transformation_mode '{coord}' not supported")
        if mode == "nearest" and nearest not in _RESIZE_NEAREST_MODES:
            bad(f"nearest_mode '{nearest}' not supported")
        if int(attrs.get("antialias", 0)):
            bad("antialiasing is not supported")
        if _text(attrs.get("keep_aspect_ratio_policy", b"stretch")) != "stretch":
            bad("only keep_aspect_ratio_policy 'stretch' is supported")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        constant_input(1, "scale")
        if len(inputs) < 3 or not inputs[2]:
            if op == "QuantizeLinear":
                bad("no zero point: the default quantized type is uint8; TensorRT needs int8 with "
                    "zero point 0")
        else:
            zp = _constant_array(inputs[2], init_values, const_nodes)
            if zp is None:
                bad(f"zero point '{inputs[2]}' must be a constant")
            else:
                if zp.dtype != np.int8:
                    bad(f"zero point type {zp.dtype} (TensorRT quantizes to int8 only)")
                if np.any(zp != 0):
                    bad("zero point must be 0 (TensorRT uses symmetric quantization)")
    elif op == "Cast":
        to = int(attrs.get("to", 0))
        if to not in _TRT_TYPES:
            bad(f"cast to {TensorProto.DataType.Name(to)}, which TensorRT lacks")
        elif to == TensorProto.UINT8 and not all(o in graph_io for o in node.output):
            bad("cast to UINT8 inside the graph (TensorRT allows uint8 only as network input/output)")
    elif op == "Constant":
        for key in ("sparse_value", "value_string", "value_strings"):
            if key in attrs:
                bad(f"Constant with '{key}' is not supported")
    elif op in ("CumSum", "TopK", "OneHot"):
        constant_input(1, "axis/K/depth")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_value_types(inferred: onnx.ModelProto, graph_io: set[str], problems: list[Problem]) -> None:
    """Intermediate tensors must have a TensorRT type; uint8 only at the graph boundary."""
    producer = {o: n for n in inferred.graph.node for o in n.output}
    for vi in inferred.graph.value_info:
        elem = vi.type.tensor_type.elem_type
        node = producer.get(vi.name)
        if elem == 0:
            continue
        if elem not in _TRT_TYPES or (elem == TensorProto.UINT8 and vi.name not in graph_io):
            if node is not None and node.op_type in ("QuantizeLinear",) and elem == TensorProto.UINT8:
                continue  # reported on the node itself (missing int8 zero point)
            problems.append(Problem(
                f"produces tensor '{vi.name}' of type {TensorProto.DataType.Name(elem)}, which TensorRT "
                "cannot hold inside a network", node.name if node else None, node.op_type if node else None))
