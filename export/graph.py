"""The exported graph's contract and small, torch-free ONNX helpers.

Every graph export writes has the same I/O, whatever its precision:

- input ``images``: uint8, N x 3 x H x W, RGB, values 0..255 (N dynamic, named "batch"; H, W the
  bundle's ``input.height`` / ``input.width``, static). Casting, /255 and mean/std are inside.
- outputs ``anomaly_map``: float32 N x 1 x H x W, and ``image_score``: float32 N (the bundle's
  image-score rule, ``image_score`` in the manifest).

This module needs only ``onnx`` (no torch), so a Jetson that reuses a bundle's graphs to build an
engine does not need the training stack.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import onnx
from onnx import TensorProto, helper, numpy_helper

from edgestad.contract import (BATCH_DIM, INPUT_NAME, MAP_NAME, ONNX_FILES,  # noqa: F401
                               OUTPUT_NAMES, PRECISIONS, REPORT_FILE, SCORE_NAME, VALID_BOX_NAME)
# Opset 17 is the newest TensorRT 8.6 (JetPack 6.0) parses; TensorRT 10 reads up to 20+.
# torch's exporter writes opset 18, which downgrade_to_opset17 rewrites exactly (see there).
DEFAULT_OPSET = 17
MIN_OPSET = 17
METADATA_FORMAT = "edgestad-onnx/1"


class GraphError(ValueError):
    """An ONNX graph does not have the contract's inputs/outputs or cannot be rewritten."""


# ------------------------------------------------------------------------------ contract


def _dims(value_info: onnx.ValueInfoProto) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def io_contract_problems(model: onnx.ModelProto, input_size: tuple[int, int] | None = None,
                         valid_box: bool | None = None) -> list[str]:
    """What is wrong with the graph's inputs and outputs (empty list: matches the contract).
    ``valid_box``: whether the graph must (True) / must not (False) take the letterbox input."""
    problems = []
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    names = [i.name for i in inputs]
    if valid_box is None:
        valid_box = VALID_BOX_NAME in names
    expected = [INPUT_NAME, VALID_BOX_NAME] if valid_box else [INPUT_NAME]
    if names != expected:
        problems.append(f"graph inputs are {names}, expected {expected}")
    else:
        if valid_box:
            box = inputs[1]
            if box.type.tensor_type.elem_type != TensorProto.FLOAT or len(_dims(box)) != 2 \
                    or _dims(box)[1] != 4:
                problems.append(f"input '{VALID_BOX_NAME}' must be FLOAT [batch, 4], got "
                                f"{TensorProto.DataType.Name(box.type.tensor_type.elem_type)} {_dims(box)}")
        inp = inputs[0]
        dtype = inp.type.tensor_type.elem_type
        if dtype != TensorProto.UINT8:
            problems.append(f"input '{INPUT_NAME}' has type {TensorProto.DataType.Name(dtype)}, expected UINT8")
        dims = _dims(inp)
        if len(dims) != 4 or dims[1] != 3:
            problems.append(f"input '{INPUT_NAME}' has shape {dims}, expected [batch, 3, H, W]")
        elif input_size is not None and tuple(dims[2:]) != tuple(input_size):
            problems.append(f"input '{INPUT_NAME}' has spatial size {dims[2:]}, the bundle says {list(input_size)}")
    outputs = {o.name: o for o in graph.output}
    if list(outputs) != list(OUTPUT_NAMES):
        problems.append(f"graph outputs are {list(outputs)}, expected {list(OUTPUT_NAMES)}")
        return problems
    for name, rank in ((MAP_NAME, 4), (SCORE_NAME, 1)):
        out = outputs[name]
        dtype = out.type.tensor_type.elem_type
        if dtype != TensorProto.FLOAT:
            problems.append(f"output '{name}' has type {TensorProto.DataType.Name(dtype)}, expected FLOAT")
        if len(_dims(out)) != rank:
            problems.append(f"output '{name}' has shape {_dims(out)}, expected rank {rank}")
    return problems


def check_io_contract(model: onnx.ModelProto, input_size: tuple[int, int] | None = None,
                      valid_box: bool | None = None) -> None:
    problems = io_contract_problems(model, input_size, valid_box)
    if problems:
        raise GraphError("exported graph breaks the I/O contract: " + "; ".join(problems))


# ------------------------------------------------------------------------------ metadata


def set_metadata(model: onnx.ModelProto, props: Mapping[str, Any]) -> None:
    """Set model-level metadata_props; non-string values are stored as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in existing:
            existing[key].value = text
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, text


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphError("graph imports no default-domain (ai.onnx) opset")


# ------------------------------------------------------------------------------ clean-up


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make a graph small and portable: unique node names, no exporter debug metadata, the
    lowest IR version its opsets allow (older TensorRT parsers warn about newer IR versions).

    torch's exporter attaches stack traces and FX node text to every node and value
    (IR-10 ``metadata_props``); they bloat the file, leak source paths and mean nothing on a device.
    Node names matter: fp16 block lists and compatibility messages refer to nodes by name.
    """
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        del value.metadata_props[:]
    for init in graph.initializer:
        del init.metadata_props[:]
    del graph.metadata_props[:]
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        del node.metadata_props[:]
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    opsets = [helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    try:
        model.ir_version = max(helper.find_min_ir_version_for(opsets, ignore_unknown=True), 7)
    except Exception:  # unknown domain/version combination: keep what the producer wrote
        pass
    return model


# ------------------------------------------------------------------------------ opset 18 -> 17

# Opset 18 moved `axes` of these reductions from an attribute to an input (ReduceSum did so in 13).
_REDUCE_AXES_MOVED_IN_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
# Resize attributes added in 18, with the values that mean "same as opset 13".
_RESIZE_ATTRS_NEW_IN_18 = {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}


def _constant_values(model: onnx.ModelProto) -> dict[str, Any]:
    values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def downgrade_to_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite an opset-18 graph as opset 17, exactly (same computation), or raise GraphError.

    onnx's version converter has no 18->17 adapter for Pad, so this handles the handful of
    operators whose opset-18 form differs: reductions get their constant ``axes`` input back as an
    attribute; Pad without the new ``axes`` input and Resize with default new attributes are
    unchanged in meaning. Any other operator that changed in 18 is refused rather than guessed.
    """
    if default_opset(model) != 18:
        raise GraphError(f"downgrade_to_opset17 expects an opset-18 graph, got opset {default_opset(model)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    constants = _constant_values(model)
    used_as_axes: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        schema18 = onnx.defs.get_schema(node.op_type, 18)
        if schema18.since_version < 18:
            continue  # unchanged between 17 and 18
        where = f"node '{node.name}' ({node.op_type})"
        if node.op_type in _REDUCE_AXES_MOVED_IN_18:
            if len(node.input) >= 2 and node.input[1]:
                axes_name = node.input[1]
                if axes_name not in constants:
                    raise GraphError(f"{where}: axes input '{axes_name}' is not a constant; cannot express in opset 17")
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in constants[axes_name].ravel()]))
                used_as_axes.add(axes_name)
                del node.input[1:]
            noop = [a for a in node.attribute if a.name == "noop_with_empty_axes"]
            if noop:
                if noop[0].i and not any(a.name == "axes" for a in node.attribute):
                    raise GraphError(f"{where}: noop_with_empty_axes=1 has no opset-17 equivalent")
                node.attribute.remove(noop[0])
        elif node.op_type == "Pad":
            if len(node.input) >= 4 and node.input[3]:
                raise GraphError(f"{where}: the opset-18 'axes' input has no opset-17 equivalent")
        elif node.op_type == "Resize":
            for attr in list(node.attribute):
                if attr.name in _RESIZE_ATTRS_NEW_IN_18:
                    value = helper.get_attribute_value(attr)
                    if value != _RESIZE_ATTRS_NEW_IN_18[attr.name]:
                        raise GraphError(f"{where}: {attr.name}={value!r} has no opset-17 equivalent")
                    node.attribute.remove(attr)
                elif attr.name == "axes":
                    raise GraphError(f"{where}: the opset-18 'axes' attribute has no opset-17 equivalent")
        else:
            raise GraphError(f"{where} changed in opset 18 and has no exact opset-17 rewrite here; "
                             "export with --opset 18")
    # Drop axes constants nothing else reads any more.
    still_used = {name for node in model.graph.node for name in node.input}
    dead = used_as_axes - still_used
    keep_init = [i for i in model.graph.initializer if i.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_init)
    keep_nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in dead)]
    del model.graph.node[:]
    model.graph.node.extend(keep_nodes)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    return model


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at the requested default-domain opset (>= MIN_OPSET)."""
    if opset < MIN_OPSET:
        raise GraphError(f"opset {opset} is below the minimum {MIN_OPSET} (TensorRT-ready graphs need >= {MIN_OPSET})")
    current = default_opset(model)
    if opset == current:
        return model
    if opset == 17 and current == 18:
        return downgrade_to_opset17(model)
    if opset > current:
        from onnx import version_converter
        try:
            return version_converter.convert_version(model, opset)
        except Exception as exc:
            raise GraphError(f"cannot convert the graph from opset {current} to {opset}: {exc}") from exc
    raise GraphError(f"cannot convert the graph from opset {current} down to {opset}")


# ------------------------------------------------------------------------------ typing helpers


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name (inputs, outputs, initializers, inferred values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    for node in inferred.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output if name}


def ancestors(node: onnx.NodeProto, produced_by: dict[str, onnx.NodeProto],
              cache: dict[str, frozenset]) -> frozenset:
    """Names of all nodes ``node`` depends on (iterative DFS with memo; graphs are deep)."""
    if node.name in cache:
        return cache[node.name]
    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if current.name in cache:
            continue
        parents = [produced_by[i] for i in current.input if i in produced_by]
        if not expanded:
            stack.append((current, True))
            stack.extend((p, False) for p in parents if p.name not in cache)
            continue
        result: set[str] = set()
        for p in parents:
            result.add(p.name)
            result |= cache[p.name]
        cache[current.name] = frozenset(result)
    return cache[node.name]


def names(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    return [n.name for n in nodes]
