"""FP16 and INT8 graphs made from the fp32 graph: precision lives in the ONNX graph itself.

TensorRT 11 dropped the FP16/INT8 builder flags and calibrators (TensorRT 10 deprecates them), so
the engine is built *strongly typed*: every layer runs in the type the graph gives it. This module
therefore writes the precision into the graph.

FP16 rule (structural, method-agnostic): a node runs in fp16 iff it feeds a convolution or is
one, i.e. it is an ancestor-or-self of some ``Conv`` node, except the input normalisation that all
convolutions share (Cast uint8->float, /255, -mean, /std). Everything downstream of the last Conv
of each network stays float32: the crop of the descriptor map, descriptor normalisation
(t - mu) / sigma, the students' mean, the regression error e and predictive variance v (squared
differences summed over d = 128 channels, where fp16 rounding and the e cancellation matter most),
their normalisation by validation statistics, the multi-scale average, the upsampling and the image
max. These are cheap element-wise ops next to the convolutions, so fp32 costs little.
Nodes a method declares fp32 (``Method.fp32_modules``, stored in the graph's metadata) stay fp32,
and a declared-fp32 Conv (the map smoothing, RSTPM's discriminator input block) does not pull the
nodes feeding it into fp16.

INT8 rule: explicit Q/DQ (QDQ format, onnxruntime's quantizer) on the *inputs* of every Conv the
method did not declare fp32 only:
symmetric int8 activations (per tensor) and symmetric int8 weights (per output channel), zero points
0, bias left float (TensorRT folds it), conv outputs *not* quantized. So every convolution runs
int8 x int8 with float output, while the descriptors that leave the last conv of each network, and
all scoring math after them, stay float32 - an int8 descriptor would quantize the regression error
itself. Calibration ranges come from good training images. The pretrained backbones' first
stages (stem and the stages up to stride ``--int8-fp16-stride``, default 4; recorded by
``export_fp32``) are not quantized but run in fp16: per-tensor int8 on the low-level features of
low-contrast parts cost magnetic_tile 0.0195 AU-PRO, and those stages alone hold all of it. Nor
are the backbone layers that feed a module the method declares sensitive to int8 inputs
(``Method.int8_fp16_feeds``: the global branch's Gaussian, a Mahalanobis distance over about a
thousand pooled channels that adds their rounding noise up): with them int8, the global score of
screw correlated 0.952 with fp32's and the int8 graph decided differently on 31 % of the test
parts; with the teacher's layers that feed it in fp16 (the students stay int8), 0.9998 and 1.2 %,
as the fp16 graph.
"""
from __future__ import annotations

import contextlib
import io
import logging
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import INPUT_NAME, GraphError, ancestors, finalize, producers, read_metadata, tensor_types
from .onnx_export import FP32_NODES_KEY, INT8_FEEDS_KEY, INT8_FP16_KEY

FP16_RULE = ("fp16: every node that is a Conv or feeds one, except the shared input normalisation; "
             "fp32: input normalisation, the nodes the method declares fp32, and everything after "
             "the last other Conv of each network (crop, descriptor normalisation, e, v, score normalisation, fusion, upsampling, max)")
INT8_RULE = ("int8: Q/DQ on the inputs of every Conv not declared fp32, not in the backbones' "
             "first stages (those run fp16; `--int8-fp16-stride`) and not feeding the global branch "
             "(those run fp16) (symmetric int8 activations per tensor, "
             "symmetric int8 weights per output channel, zero point 0, float bias, conv outputs not "
             "quantized); everything else float32 as in the fp32 graph")


# ------------------------------------------------------------------------------------ FP16


@dataclass
class Fp16Split:
    fp16_nodes: list[str]
    fp32_nodes: list[str]          # the block list handed to the converter
    input_normalisation: list[str]
    scoring_tail: list[str]


def forced_fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes the method declared fp32 (``Method.fp32_modules``; stored by export_fp32)."""
    stored = read_metadata(model).get(FP32_NODES_KEY)
    return set(json.loads(stored)) if stored else set()


def int8_fp16_nodes(model: onnx.ModelProto, stride: int) -> set[str]:
    """What the int8 graph keeps in fp16, as export_fp32 recorded it (the nodes declared fp32
    already left out): the backbones' layers at strides ≤ ``stride`` (none for 0), and always the
    backbone layers that feed a module the method declared sensitive to int8 inputs
    (``Method.int8_fp16_feeds``: the global branch)."""
    meta = read_metadata(model)
    feeds = set(json.loads(meta[INT8_FEEDS_KEY])) if meta.get(INT8_FEEDS_KEY) else set()
    stored = meta.get(INT8_FP16_KEY)
    if not stride or not stored:
        return feeds
    recorded = json.loads(stored)
    if str(stride) not in recorded:
        raise GraphError(f"--int8-fp16-stride {stride}: not one of the recorded strides "
                         f"{sorted(int(s) for s in recorded)}")
    return set(recorded[str(stride)]) | feeds


def fp16_split(model: onnx.ModelProto) -> Fp16Split:
    """Which nodes run fp16 and which stay fp32, by the rule in the module docstring, minus the
    nodes the method declared fp32."""
    nodes = list(model.graph.node)
    forced = forced_fp32_nodes(model)
    # Convs the method declared fp32 (e.g. the map smoothing) do not pull their inputs into fp16.
    convs = [n for n in nodes if n.op_type == "Conv" and n.name not in forced]
    if not convs:
        raise GraphError("fp16 conversion: the graph has no Conv node, so the fp16 region is empty")
    produced_by = producers(model)
    cache: dict[str, frozenset] = {}
    feeding: set[str] = set()
    common: set[str] | None = None
    for conv in convs:
        upstream = set(ancestors(conv, produced_by, cache)) | {conv.name}
        feeding |= upstream
        common = upstream if common is None else common & upstream
    conv_names = {c.name for c in convs}
    shared_prefix = (common or set()) - conv_names
    # Pad/Slice/Max between the shared prefix and the first conv of a network belong to that
    # network; only the arithmetic normalisation ahead of every network is kept fp32.
    by_name = {n.name: n for n in nodes}
    normalisation = {n for n in shared_prefix
                     if by_name[n].op_type in ("Cast", "Div", "Sub", "Mul", "Add")}
    fp16 = [n.name for n in nodes if n.name in feeding and n.name not in normalisation
            and n.name not in forced]
    fp32 = [n.name for n in nodes if n.name not in set(fp16)]
    tail = [n.name for n in nodes if n.name not in feeding]
    return Fp16Split(fp16, fp32, sorted(normalisation), tail)


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The fp16 graph (float32 I/O kept) and a description of what was converted."""
    split = fp16_split(model)
    converted, stats = convert_region_to_fp16(model, set(split.fp16_nodes))
    converted = finalize(converted)
    info = {
        "rule": FP16_RULE,
        "fp16_nodes": len(split.fp16_nodes),
        "fp32_nodes": len([n for n in split.fp32_nodes if not n.startswith("Constant")]),
        "fp32_input_normalisation": split.input_normalisation,
        "fp32_scoring_tail_ops": _op_histogram(model, split.scoring_tail),
        "casts_inserted": stats["casts"],
        "initializers_converted": stats["initializers"],
        "weights_clipped_to_fp16_range": stats["clipped"],
        "weights_flushed_to_zero": stats["flushed"],
        "converter": "edgestad.export.precision.convert_region_to_fp16 (casts only at region borders)",
    }
    return converted, info


_FLOAT, _HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal


def _same_type_inputs(node: onnx.NodeProto, opset: int) -> list[bool]:
    """Per input: does it share the type variable of output 0 (so it must follow it to fp16)?

    Schema-driven, so e.g. Slice bounds (Tind), Resize scales (tensor(float)) or Pad's pads stay
    as they are while data inputs follow the node's precision.
    """
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    out_type = schema.outputs[0].type_str if schema.outputs else None
    flags = []
    for i in range(len(node.input)):
        formal = schema.inputs[min(i, len(schema.inputs) - 1)] if schema.inputs else None
        flags.append(formal is not None and formal.type_str == out_type)
    return flags


def convert_region_to_fp16(model: onnx.ModelProto, fp16_nodes: set[str]) -> tuple[onnx.ModelProto, dict]:
    """Run exactly the nodes in ``fp16_nodes`` in float16; everything else stays float32.

    A Cast is inserted only where a float tensor crosses the region border, once per tensor.
    Float initializers read only inside the region are stored as fp16; one read on both sides gets
    an fp16 copy. Graph inputs and outputs keep their types.

    Why not onnxconverter-common's (or onnxruntime.transformers') convert_float_to_float16 with a
    node block list: both treat a blocked node as an fp32 island inside an fp16 graph and cast its
    outputs back to fp16, so consecutive blocked nodes exchange e and v through fp16 round trips,
    the statistics initializers are stored as fp16, and (onnxconverter-common 1.16) the graph
    outputs came out fp16 despite keep_io_types. The rule here needs the opposite: an fp32 tail.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = tensor_types(model)
    graph_outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    region_nodes = [n for n in graph.node if n.name in fp16_nodes]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    produced_in_region = {o for n in region_nodes for o in n.output if types.get(o) == _FLOAT}
    stats = {"casts": 0, "initializers": 0, "clipped": 0, "flushed": 0}

    def half_array(tensor: onnx.TensorProto) -> np.ndarray:
        values = numpy_helper.to_array(tensor).astype(np.float64)
        stats["clipped"] += int(np.sum(np.abs(values) > _FP16_MAX))
        stats["flushed"] += int(np.sum((values != 0) & (np.abs(values) < _FP16_TINY)))
        return np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)

    new_nodes: list[onnx.NodeProto] = []
    casts_done: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts_done:
            suffix = "fp16" if to == _HALF else "fp32"
            out = f"{name}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"cast_{out}", to=to))
            casts_done[key] = out
            stats["casts"] += 1
        return casts_done[key]

    half_copies: dict[str, str] = {}
    for node in graph.node:
        in_region = node.name in fp16_nodes
        if in_region:
            follows = _same_type_inputs(node, opset)
            for i, name in enumerate(node.input):
                if not name or not follows[i] or types.get(name) != _FLOAT or name in produced_in_region:
                    continue
                if name in inits:
                    if all(r.name in fp16_nodes for r in readers[name]):
                        if inits[name].data_type == _FLOAT:
                            inits[name].CopyFrom(numpy_helper.from_array(half_array(inits[name]), name))
                            stats["initializers"] += 1
                    else:
                        if name not in half_copies:
                            copy_name = f"{name}__fp16"
                            graph.initializer.append(numpy_helper.from_array(half_array(inits[name]), copy_name))
                            half_copies[name] = copy_name
                            stats["initializers"] += 1
                        node.input[i] = half_copies[name]
                else:
                    node.input[i] = cast(name, _HALF)
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == _FLOAT:
                        a.i = _HALF
            elif node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == _FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(half_array(a.t), a.t.name))
            elif node.op_type == "ConstantOfShape":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == _FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(half_array(a.t), a.t.name))
            for i, name in enumerate(node.output):
                if name in graph_outputs and name in produced_in_region:
                    node.output[i] = f"{name}__region"
                    new_nodes.append(node)
                    new_nodes.append(helper.make_node("Cast", [node.output[i]], [name],
                                                      name=f"cast_{name}__fp32", to=_FLOAT))
                    stats["casts"] += 1
                    break
            else:
                new_nodes.append(node)
        else:
            for i, name in enumerate(node.input):
                if name in produced_in_region:
                    node.input[i] = cast(name if name not in graph_outputs else f"{name}__region", _FLOAT)
            new_nodes.append(node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    # Shapes are unchanged; only element types of region tensors change. Let inference redo them.
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    return model, stats


def _op_histogram(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    wanted = set(names)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.name in wanted and n.op_type != "Constant":
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------ INT8


class ImageCalibrationReader:
    """onnxruntime CalibrationDataReader over uint8 N x 3 x H x W images, one image per batch
    (the calibrator's memory grows with the batch; ranges do not depend on it)."""

    def __init__(self, images: np.ndarray, input_name: str = INPUT_NAME, with_box: bool = False):
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != 3:
            raise ValueError(f"calibration images must be uint8 N x 3 x H x W, got {images.dtype} {images.shape}")
        self.images = images
        self.input_name = input_name
        self.with_box = with_box          # letterbox graphs: feed the whole canvas as valid
        self._next = 0

    def get_next(self):
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next:self._next + 1]
        self._next += 1
        feed = {self.input_name: batch}
        if self.with_box:
            from .graph import VALID_BOX_NAME
            h, w = batch.shape[-2:]
            feed[VALID_BOX_NAME] = np.array([[0, 0, h, w]], dtype=np.float32)
        return feed

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.images)


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs a pre-processing hint on the root logger and prints histogram
    progress to stdout. The hint does not apply (the exporter's graph already carries full shape
    information and needs no ORT-specific optimisation), so keep the CLI output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def to_int8(model: onnx.ModelProto, calibration: np.ndarray, method: str = "minmax",
            workdir: str | os.PathLike | None = None, fp16_stride: int = 0
            ) -> tuple[onnx.ModelProto, dict]:
    """The explicitly quantized (Q/DQ) int8 graph and a description of what was quantized;
    ``fp16_stride``: the backbones' layers up to this stride stay unquantized, in fp16 (0: none)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {CALIBRATION_METHODS}")
    calib_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy}[method]

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    from .graph import VALID_BOX_NAME
    reader = _Reader(calibration, with_box=any(i.name == VALID_BOX_NAME for i in model.graph.input))
    forced = forced_fp32_nodes(model)
    keep_fp16 = int8_fp16_nodes(model, fp16_stride)
    extra = {
        "ActivationSymmetric": True,      # TensorRT: int8 with zero point 0
        "WeightSymmetric": True,
        "QuantizeBias": False,            # TensorRT takes a float bias and fuses it
        "OpTypesToExcludeOutputQuantization": ["Conv"],  # only conv inputs; descriptors stay float
        "DedicatedQDQPair": False,
    }
    with tempfile.TemporaryDirectory(prefix="edgestad-int8-", dir=workdir) as tmp:
        src = Path(tmp) / "fp32.onnx"
        dst = Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        with _quiet_quantizer():
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                nodes_to_exclude=sorted(forced | keep_fp16),
                weight_type=QuantType.QInt8, calibrate_method=calib_method, extra_options=extra)
        quantized = onnx.load(str(dst))
    quantized = finalize(quantized)
    fp16_convs = [n.name for n in quantized.graph.node if n.op_type == "Conv" and n.name in keep_fp16]
    if keep_fp16:
        # The backbones' first stages: not quantized, run in fp16 (casts at the region borders).
        quantized, _ = convert_region_to_fp16(quantized, keep_fp16 & {n.name for n in quantized.graph.node})
        quantized = finalize(quantized)
    convs = [n for n in quantized.graph.node if n.op_type == "Conv" and n.name not in forced
             and n.name not in keep_fp16]
    dq_outputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    quantized_convs = [c for c in convs if c.input[0] in dq_outputs and c.input[1] in dq_outputs]
    if len(quantized_convs) != len(convs):
        missing = [c.name for c in convs if c not in quantized_convs]
        raise GraphError(f"int8 quantization left {len(missing)} Conv node(s) unquantized: {missing[:5]}")
    info = {
        "rule": INT8_RULE,
        "quantizer": "onnxruntime.quantization.quantize_static (QuantFormat.QDQ)",
        "calibration_method": method,
        "calibration_images": int(len(calibration)),
        "quantized_convs": len(quantized_convs),
        "fp16_convs": len(fp16_convs),
        "fp16_region": (f"backbone layers at strides <= {fp16_stride} (stem and first stages), not "
                        "quantized, in fp16" if fp16_convs else "none"),
        "activation_type": "int8 symmetric, per tensor",
        "weight_type": "int8 symmetric, per output channel (axis 0)",
        "bias": "float32 (not quantized)",
        "fp32_nodes_declared_by_method": len(forced),
    }
    return quantized, info
