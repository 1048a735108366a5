"""edgestad.runner: the one backend vocabulary, and OrtRunner's batching, boxes and errors."""
from __future__ import annotations

import numpy as np
import pytest

from edgestad.runner import (BENCH_BACKENDS, EVALUATE_BACKENDS, RUN_BACKENDS, OrtRunner, RunnerError,
                             backend_spellings, canonical_backend, parse_backend, run_graph)
from test_runtime_toy import toy_graph


def test_one_vocabulary_keeps_every_name_each_command_accepted():
    assert parse_backend("ort-fp16") == ("onnxruntime", "fp16")
    assert parse_backend("torch-cuda-fp16") == ("torch-cuda", "fp16")
    assert parse_backend("onnx") == parse_backend("onnxruntime") == ("onnxruntime", None)
    with pytest.raises(ValueError, match="cuda-magic"):
        parse_backend("cuda-magic")
    # the names each command took before, still taken and still written as before
    assert {"auto", "onnxruntime", "tensorrt"} <= set(backend_spellings(RUN_BACKENDS))
    assert {"torch", "onnx"} <= set(backend_spellings(EVALUATE_BACKENDS))
    assert BENCH_BACKENDS == ("torch", "ort-fp32", "ort-fp16", "ort-int8", "torch-cuda",
                              "torch-cuda-fp16", "tensorrt")
    assert canonical_backend("onnxruntime", EVALUATE_BACKENDS) == "onnx"
    assert canonical_backend("onnx", RUN_BACKENDS) == "onnxruntime"
    assert canonical_backend("onnxruntime-int8", BENCH_BACKENDS) == "ort-int8"
    with pytest.raises(ValueError, match="choose from auto, onnxruntime, tensorrt"):
        canonical_backend("torch", RUN_BACKENDS)


def test_commands_offer_the_vocabulary():
    from edgestad.evaluate import evaluate_command
    from edgestad.runtime.cli import main as run_main
    run = next(c for c in run_main.commands["run"].params if c.name == "backend")
    assert list(run.type.choices) == backend_spellings(RUN_BACKENDS)
    evaluate = next(c for c in evaluate_command.params if c.name == "backend")
    assert list(evaluate.type.choices) == backend_spellings(EVALUATE_BACKENDS)


def _box_graph(h=8, w=8) -> bytes:
    """images, valid_box -> map = image brightness, score = map max + box area / 1000."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "c"], ["anomaly_map"], keepdims=1),
             helper.make_node("ReduceMax", ["anomaly_map", "all"], ["m"], keepdims=0),
             helper.make_node("Sub", ["valid_box", "zero"], ["b"]),
             helper.make_node("Slice", ["b", "s2", "e4", "ax1"], ["br"]),
             helper.make_node("Slice", ["b", "s0", "e2", "ax1"], ["tl"]),
             helper.make_node("Sub", ["br", "tl"], ["hw"]),
             helper.make_node("ReduceProd", ["hw", "ax1"], ["area"], keepdims=0),
             helper.make_node("Div", ["area", "k"], ["a"]),
             helper.make_node("Add", ["m", "a"], ["image_score"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("c", [1]), ("all", [1, 2, 3]), ("s2", [2]), ("e4", [4]), ("s0", [0]), ("e2", [2]),
              ("ax1", [1]))]
    inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
              numpy_helper.from_array(np.array(1000, np.float32), "k")]
    graph = helper.make_graph(
        nodes, "box", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, h, w]),
                       helper.make_tensor_value_info("valid_box", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, h, w]),
         helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["batch"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_ort_runner_batches_and_feeds_the_box():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    with OrtRunner(_box_graph(), batch_size=2) as runner:
        assert runner.takes_valid_box and runner.input_shape == (3, 8, 8)
        maps, scores = runner.infer(images)                       # full frame: area 64
        boxes = np.tile(np.array([1, 2, 5, 6], np.float32), (5, 1))  # area 16
        _, boxed = runner.infer(images, boxes)
        with pytest.raises(RunnerError, match=r"valid boxes must be \(5, 4\)"):
            runner.infer(images, boxes[:3])
        with pytest.raises(RunnerError, match="input must be uint8"):
            runner.infer(images.astype(np.float32))
    assert maps.shape == (5, 8, 8) and maps.dtype == scores.dtype == np.float32
    np.testing.assert_allclose(scores - boxed, 0.048, atol=1e-4)
    np.testing.assert_allclose(scores, maps.reshape(5, -1).max(axis=1) + 0.064, atol=1e-4)
    assert not runner.active and runner.session is None


def test_run_graph_equals_one_call_and_bad_graphs_are_named():
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    maps, scores = run_graph(toy_graph(8, 8), images, batch_size=2)
    np.testing.assert_allclose(maps, images.astype(np.float32).mean(axis=1) / 255, rtol=1e-6)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)
    with pytest.raises(RunnerError, match="ONNX Runtime cannot load the graph"):
        OrtRunner(b"not a graph").activate()
