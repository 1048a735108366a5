"""STFPM and the ResNet-students method: what is specific to them."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgestad.methods import get_method  # noqa: E402
from edgestad.methods.base import FitContext  # noqa: E402
from edgestad.methods.stfpm.method import level_distance  # noqa: E402


def test_level_distance_is_half_the_squared_distance_of_normalised_features():
    t = torch.tensor([[[[3.0]], [[4.0]]]])      # 1×2×1×1, norm 5
    s = torch.tensor([[[[0.0]], [[2.0]]]])      # norm 2
    expected = 0.5 * ((3 / 5 - 0) ** 2 + (4 / 5 - 1) ** 2)
    assert float(level_distance(t, s)) == pytest.approx(expected)


def test_map_is_the_product_of_upsampled_level_maps():
    """map_grid "input" (the paper's wording, and every bundle made before map_grid): each level
    upsampled to the input, then multiplied. The default "finest" is test_common's."""
    method = get_method("stfpm")
    assert method.make_config().map_grid == "finest"
    model = method.build(method.make_config(input_size=(64, 64), map_grid="input")).eval()
    x = model.normalize_input(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        parts = method.parts(model, x)
        product = torch.ones(1, 1, 64, 64)
        for m in parts.values():
            product = product * m
        assert torch.allclose(model.anomaly_map(x), product)
    assert list(parts) == ["s4", "s8", "s16"]


def test_fp16_and_int8_graphs_keep_the_map_smoothing_and_its_input_fp32():
    """The smoothing convs are declared fp32; the product map feeding them stays fp32 in the fp16
    graph and is not quantized in the int8 graph."""
    from edgestad.export.graph import producers
    from edgestad.export.onnx_export import export_fp32
    from edgestad.export.precision import forced_fp32_nodes, fp16_split, to_int8
    method = get_method("stfpm")
    config = method.make_config(input_size=(64, 64))
    assert method.fp32_modules(config) == ("map_smoothing", "global_gaussian", "score_fusion")
    assert method.fp32_modules(config.replace(global_branch=False)) == ("map_smoothing",)
    assert method.fp32_modules(config.replace(map_sigma=0.0, global_branch=False)) == ()
    proto = export_fp32(method.build(config).eval(), (64, 64), fp32_modules=method.fp32_modules(config))
    forced = forced_fp32_nodes(proto)
    smoothing = [n for n in proto.graph.node if n.op_type == "Conv" and n.name in forced]
    assert len(smoothing) == 2                          # the separable Gaussian
    produced_by = producers(proto)
    first = next(n for n in smoothing if produced_by[n.input[0]].op_type == "Concat")
    product = produced_by[produced_by[first.input[0]].input[0]]       # map·valid
    while product.op_type != "Mul" or produced_by[product.input[0]].op_type != "Resize":
        product = produced_by[product.input[0]]
    fp32 = set(fp16_split(proto).fp32_nodes)
    assert {n.name for n in smoothing} <= fp32 and product.name in fp32
    calibration = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    quantized, _ = to_int8(proto, calibration)
    q_produced_by = producers(quantized)
    for conv in smoothing:
        q_conv = next(n for n in quantized.graph.node if n.name == conv.name)
        assert q_produced_by[q_conv.input[0]].op_type != "DequantizeLinear"


def test_exported_graph_scores_without_the_frame_edge_like_torch():
    """score_margin lives in the graph: the ONNX image score equals torch's, and a hot edge that
    decides the score without the margin does not decide it with one."""
    ort = pytest.importorskip("onnxruntime")
    from edgestad.export.onnx_export import export_fp32
    method = get_method("stfpm")
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    images[0, :, :6, :6] = 255                          # a bright corner on the first image
    scores = {}
    for margin in (0, 6):
        config = method.make_config(input_size=(64, 64), global_branch=False, image_score="max",
                                    score_margin=margin)
        torch.manual_seed(0)
        model = method.build(config).eval()
        proto = export_fp32(model, (64, 64), fp32_modules=method.fp32_modules(config))
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got_map, got_score = session.run(None, {"images": images})
        with torch.no_grad():
            ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(images)))
        assert np.allclose(got_score, ref_score, rtol=1e-4, atol=1e-7)
        inner = got_map[:, 0, margin:64 - margin, margin:64 - margin]
        assert np.allclose(got_score, inner.reshape(2, -1).max(1), rtol=1e-5)
        scores[margin] = got_score
    assert scores[6][0] < scores[0][0]                  # the corner no longer decides


def test_int8_graph_keeps_the_backbones_first_stages_in_fp16():
    """--int8-fp16-stride 4: the stem and stride-2/4 stages of teacher and student are not
    quantized and run fp16; every other Conv (except the fp32 smoothing) is int8."""
    from edgestad.export.graph import producers, tensor_types
    from edgestad.export.onnx_export import early_stage_modules, export_fp32
    from edgestad.export.precision import forced_fp32_nodes, int8_fp16_nodes, to_int8
    method = get_method("stfpm")
    config = method.make_config(input_size=(64, 64))
    model = method.build(config).eval()
    assert early_stage_modules(model, 4) == [f"{net}.{child}" for net in ("teacher", "student")
                                             for child in ("stem", "blocks.0", "blocks.1", "blocks.2")]
    proto = export_fp32(model, (64, 64), fp32_modules=method.fp32_modules(config))
    early = int8_fp16_nodes(proto, 4)
    assert int8_fp16_nodes(proto, 2) < early < int8_fp16_nodes(proto, 8)
    assert int8_fp16_nodes(proto, 0) == set()
    early_convs = {n.name for n in proto.graph.node if n.op_type == "Conv" and n.name in early}
    assert len(early_convs) == 2 * (1 + 2 + 3 + 3)      # stem + block 0 (2 convs) + blocks 1-2 (3 each)
    calibration = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    quantized, info = to_int8(proto, calibration, fp16_stride=4)
    assert info["fp16_convs"] == len(early_convs)
    produced_by, types = producers(quantized), tensor_types(quantized)
    forced = forced_fp32_nodes(proto)
    for conv in (n for n in quantized.graph.node if n.op_type == "Conv"):
        source = produced_by[conv.input[0]].op_type
        if conv.name in early_convs:
            assert source != "DequantizeLinear" and types[conv.input[1]] == 10, conv.name  # FLOAT16
        elif conv.name not in forced:
            assert source == "DequantizeLinear", conv.name
    assert info["quantized_convs"] == len([n for n in proto.graph.node if n.op_type == "Conv"]) \
        - len(early_convs) - len([n for n in proto.graph.node if n.op_type == "Conv" and n.name in forced])


def test_int8_graph_keeps_what_feeds_the_global_branch_in_fp16():
    """The global branch's Mahalanobis distance adds up the int8 noise of a thousand pooled
    channels, so the teacher layers that feed it are not quantized (fp16) in the int8 graph,
    whatever --int8-fp16-stride says; the students (which only feed the map) stay int8."""
    from edgestad.export.graph import ancestors, producers
    from edgestad.export.onnx_export import export_fp32
    from edgestad.export.precision import forced_fp32_nodes, int8_fp16_nodes, to_int8
    method = get_method("stfpm")
    config = method.make_config(input_size=(64, 64))
    assert method.int8_fp16_feeds(config) == ("global_gaussian",)
    assert method.int8_fp16_feeds(config.replace(global_branch=False)) == ()
    model = method.build(config).eval()
    proto = export_fp32(model, (64, 64), fp32_modules=method.fp32_modules(config),
                        int8_fp16_feeds=method.int8_fp16_feeds(config))
    convs = {n.name for n in proto.graph.node if n.op_type == "Conv"}
    # the Gaussian's nodes read its buffers; every convolution they depend on is kept, no other
    produced_by, cache = producers(proto), {}
    feeding = set()
    for node in proto.graph.node:
        if any(i.startswith("global_gaussian.") for i in node.input):
            feeding |= ancestors(node, produced_by, cache)
    kept = int8_fp16_nodes(proto, 0) & convs
    assert kept and kept == feeding & convs
    assert int8_fp16_nodes(proto, 4) > int8_fp16_nodes(proto, 0)
    student = convs - feeding - forced_fp32_nodes(proto)    # the map's own convolutions
    assert len(student) > len(kept) / 2
    calibration = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    quantized, info = to_int8(proto, calibration, fp16_stride=0)
    assert info["fp16_convs"] == len(kept)
    produced_by = producers(quantized)
    for conv in (n for n in quantized.graph.node if n.op_type == "Conv"):
        if conv.name in kept:
            assert produced_by[conv.input[0]].op_type != "DequantizeLinear", conv.name
        elif conv.name in student:
            assert produced_by[conv.input[0]].op_type == "DequantizeLinear", conv.name


def test_student_batchnorm_statistics_are_recomputed_over_the_training_images(tiny_dataset, tmp_path):
    """After fit, every student BN layer's running mean equals the exact mean of its inputs over
    the training images (not the exponential average of the training run)."""
    from edgestad.datasets import good_images, load_images
    method = get_method("stfpm")
    torch.manual_seed(0)
    model = method.build(method.make_config(input_size=(64, 64)))
    images = load_images(good_images(tiny_dataset)[:6], (64, 64))
    ctx = FitContext(epochs=1, batch_size=3, lr=0.1, checkpoint=None, progress=False)
    method.fit(model, images, ctx)
    assert ctx.provenance["batchnorm_recomputed"]["images"] == 6
    bn = model.student.stem[1]                      # the stem's BatchNorm
    inputs = []
    hook = model.student.stem[0].register_forward_hook(lambda m, i, o: inputs.append(o))
    with torch.no_grad():
        model.student(model.normalize_input(torch.from_numpy(images).permute(0, 3, 1, 2)))
    hook.remove()
    exact_mean = inputs[0].mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, exact_mean, atol=1e-5)
    assert bn.momentum == pytest.approx(0.01)       # the library's own momentum is restored
    # and the teacher is untouched by training: still the pretrained weights, eval mode
    from edgestad.methods.common.backbones import FeaturePyramid
    pretrained = FeaturePyramid("efficientnet-lite0", (4, 8, 16), weights="pretrained")
    assert torch.equal(model.teacher.stem[1].running_mean, pretrained.stem[1].running_mean)
    assert not model.teacher.training


def test_resnet_students_normalisations():
    method = get_method("resnet_students")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    # (map_sigma=0: the study's own map, unsmoothed)
    per_image = method.build(method.make_config(input_size=(64, 64), normalization="per_image",
                                                map_sigma=0.0, global_branch=False)).eval()
    with torch.no_grad():
        amap, score = per_image(images)
    # the study's per-image min-max: every image's maximum is 1, so the image score is constant
    assert torch.allclose(score, torch.ones(3))
    validation = method.build(method.make_config(input_size=(64, 64), map_sigma=0.0)).eval()
    stats = method.fit_score_statistics(validation, images, None, "cpu")
    with torch.no_grad():
        amap, _ = validation(images)
    assert float(amap.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(amap.max()) == pytest.approx(1.0, abs=1e-5)
    assert stats["map_min"] < stats["map_max"]
    with pytest.raises(ValueError, match="normalization"):
        method.make_config(normalization="zscore")


def test_default_epochs_are_60_and_fewer_only_for_large_folders():
    """stfpm's default: 60 epochs, no more than reach 960 optimizer steps (large folders get their
    steps in fewer epochs), never fewer than 30; other methods keep their fixed count."""
    stfpm = get_method("stfpm")
    assert stfpm.default_epochs(167, 16) == 60           # bottle's training images at 20 % validation
    assert stfpm.default_epochs(256, 16) == 60           # screw's: exactly 960 steps
    assert stfpm.default_epochs(400, 16) == 39           # 25 steps an epoch: ⌈960 / 25⌉
    assert stfpm.default_epochs(533, 16) == 30           # magnetic_tile's: 29 would do, 30 at least
    assert stfpm.default_epochs(10_000, 16) == 30
    assert "60 (fewer for large folders: no more than reach 960 optimizer steps, at least 30)" \
        == stfpm.epochs_rule()
    rstpm = get_method("rstpm")
    assert rstpm.default_steps is None
    assert rstpm.default_epochs(10_000, 16) == rstpm.defaults["epochs"]


@pytest.mark.parametrize("name, augment", [("stfpm", "none"), ("stfpm", "flip"), ("stfpm_ae", None)])
def test_frozen_teacher_features_are_computed_once_with_the_same_weights(name, augment, tiny_dataset,
                                                                          monkeypatch):
    """Without augmentation the teacher's features of the training images are computed once
    (FrozenFeatures) and the student trains to the same weights, bit for bit, as when the teacher
    runs in every step; with augmentation the teacher runs in every step."""
    from edgestad.datasets import good_images, load_images
    from edgestad.methods.common import training
    method = get_method(name)
    images = load_images(good_images(tiny_dataset)[:6], (64, 64))
    options = method.resolve_options({} if augment is None else {"augment": augment})

    def fit(limit):
        monkeypatch.setattr(training, "FROZEN_FEATURES_LIMIT", limit)
        torch.manual_seed(0)
        model = method.build(method.prepare(method.make_config(input_size=(64, 64)), options))
        calls = []
        model.teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        ctx = FitContext(epochs=2, batch_size=3, lr=0.1, checkpoint=None, progress=False,
                         options=options)
        history = method.fit(model, images, ctx)
        return model.state_dict(), [h["loss"] for h in history], calls

    cached, cached_losses, cached_calls = fit(2 * 1024 ** 3)
    plain, plain_losses, plain_calls = fit(0)             # too large for the limit: per step
    steps = len(plain_losses) * 2                         # 6 images, batch 3: two steps an epoch
    # one image sizes the features (not with augmentation); then every step, or once: 6 images
    # in one batch of 16
    assert plain_calls == ([3] * steps if augment == "flip" else [1] + [3] * steps)
    assert cached_calls == ([3] * steps if augment == "flip" else [1, 6])
    assert cached_losses == plain_losses
    for key, value in cached.items():
        assert torch.equal(value, plain[key]), key

