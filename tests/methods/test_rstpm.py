"""RSTPM: what is specific to it (the conformance test covers build → train → export → runtime).

- the attention path never updates teacher 2 (no gradient reaches it, its weights and BatchNorm
  statistics are the pretrained ones after training);
- focal loss (eq. 6) equals a hand-computed value;
- eq. 5 (per-resolution sums of the six Ω maps, product over resolutions) and eq. 7 (× the
  discriminator's probability) on hand-made features and maps;
- the fp16 and int8 graphs keep the distance maps and the discriminator's input in float32.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgestad.methods import get_method  # noqa: E402
from edgestad.methods.base import FitContext  # noqa: E402
from edgestad.methods.rstpm.method import (DistanceMaps, final_map, focal_loss,  # noqa: E402
                                           product_map, stack_on_grid, teacher2_pyramid)

SIZE = (64, 64)


def tiny_model():
    method = get_method("rstpm")
    config = method.make_config(input_size=SIZE, recon_channels=(16, 16, 16), disc_channels=(8, 8, 8))
    torch.manual_seed(0)
    return method, config, method.build(config)


def test_attention_path_does_not_reach_teacher2():
    method, config, model = tiny_model()
    model.train()
    x = model.normalize_input(torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8))
    # Even with teacher 2 made trainable, student 2's outputs (which depend on teacher 2 only
    # through the attention maps) give it no gradient: its features enter the attention detached.
    model.teacher2.requires_grad_(True)
    t1 = model.teacher1(x)
    t2 = model.teacher2(model.teacher2_input(x))
    sum(s.sum() for s in model.student2(t1[3], t2)).backward()
    assert all(p.grad is None for p in model.teacher2.parameters())
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0
               for a in model.student2.attention)          # the attention itself is trained
    model.teacher2.requires_grad_(False)


def test_training_leaves_teacher2_as_pretrained(tiny_dataset):
    from edgestad.datasets import good_images, load_images
    method, config, model = tiny_model()
    images = load_images(good_images(tiny_dataset)[:4], SIZE)
    ctx = FitContext(epochs=1, batch_size=2, lr=0.4, checkpoint=None, progress=False,
                     options={"disc_epochs": 1})
    before_student = {k: v.clone() for k, v in model.student2.state_dict().items()}
    method.fit(model, images, ctx)
    assert all(p.grad is None for p in model.teacher2.parameters())   # no gradient ever reached it
    pretrained = teacher2_pyramid("efficientnet-lite0", "pretrained").state_dict()
    for name, value in model.teacher2.state_dict().items():
        assert torch.equal(value, pretrained[name]), name  # weights and BN statistics unchanged
    assert not model.teacher2.training
    assert any(not torch.equal(v, before_student[k]) for k, v in model.student2.state_dict().items())
    assert ctx.provenance["teacher2"]["taps"].startswith("first block")
    assert ctx.provenance["batchnorm_recomputed"]["images"] == 4


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
    expected = 0.0
    for z, y in zip([0.0, 2.0, -1.0, 3.0], [1, 0, 1, 1]):
        p = 1 / (1 + math.exp(-z))
        pt = p if y == 1 else 1 - p
        expected += -((1 - pt) ** 2) * math.log(pt)
    expected /= 4
    assert float(focal_loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    # γ = 0 is the plain binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(float(bce), rel=1e-6)


def _features(vectors, size):
    """N=1, C=2 feature map of side ``size`` filled with the 2-vector ``vectors``."""
    return torch.tensor(vectors, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, size, size).clone()


def test_eq5_sums_per_resolution_and_multiplies_across():
    e0, e1, oblique = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]
    sides = (8, 4, 2)                                   # strides 4, 8, 16 of a 32² input
    # pair 1: Ω¹ = 1 (orthogonal), Ω² = 0 (equal), Ω³ = ½‖e0 − oblique‖² = 0.4
    t1 = [_features(e0, sides[0]), _features(e0, sides[1]), _features(e0, sides[2])]
    s1 = [_features(e1, sides[0]), _features(e0, sides[1]), _features(oblique, sides[2])]
    # pair 2: Ω⁴ = 0, Ω⁵ = 1, Ω⁶ = 1 (features scaled: the distance normalises them)
    t2 = [_features([2.0, 0.0], sides[0]), _features(e0, sides[1]), _features(e1, sides[2])]
    s2 = [_features(e0, sides[0]), _features([0.0, 5.0], sides[1]), _features(e0, sides[2])]
    maps = DistanceMaps()
    omega = maps.omegas(t1, s1, t2, s2)
    assert [float(o.mean()) for o in omega] == pytest.approx([1.0, 0.0, 0.4, 0.0, 1.0, 1.0], abs=1e-6)
    stacked, product = maps(t1, s1, t2, s2, size=(32, 32))
    assert stacked.shape == (1, 3, 8, 8)               # the three sums on the stride-4 grid
    assert stacked[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.4], abs=1e-6)
    assert product.shape == (1, 1, 32, 32)
    assert torch.allclose(product, torch.full_like(product, 1.0 * 1.0 * 1.4))


def test_eq5_and_eq7_on_hand_made_maps():
    # non-constant maps: the product is taken pixel by pixel after bilinear upsampling
    s4 = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    s8 = torch.full((1, 1, 2, 2), 2.0)
    s16 = torch.full((1, 1, 1, 1), 0.5)
    product = product_map([s4, s8, s16], (4, 4))
    assert torch.allclose(product, s4 * 2.0 * 0.5)
    assert torch.equal(stack_on_grid([s4, s8, s16])[:, 1], torch.full((1, 4, 4), 2.0))
    logits = torch.tensor([[0.0, math.log(3.0)], [-math.log(3.0), 100.0]]).view(1, 1, 2, 2)
    final = final_map(torch.ones(1, 1, 2, 2) * 4.0, logits)      # same grid: no resampling
    assert final.flatten().tolist() == pytest.approx([2.0, 3.0, 1.0, 4.0], rel=1e-6)


def test_model_map_is_st_product_times_discriminator():
    """Eq. 7 = eq. 5 × D; eq. 5 read as the paper words it (map_grid "input": every level upsampled
    to the input, then multiplied)."""
    method, config, model = tiny_model()
    model.config = model.config.replace(map_grid="input")
    model.maps.grid = "input"
    model.eval()
    x = model.normalize_input(torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8))
    with torch.no_grad():
        parts = method.parts(model, x)
        amap = model.anomaly_map(x)
        assert torch.allclose(amap, parts["st_product"] * parts["discriminator"], rtol=1e-5)
        assert torch.allclose(parts["st_product"], parts["s4"] * parts["s8"] * parts["s16"], rtol=1e-5)


@pytest.fixture(scope="module")
def exported():
    from edgestad.export.onnx_export import export_fp32
    method, config, model = tiny_model()
    model.eval()
    return export_fp32(model, SIZE, fp32_modules=method.fp32_modules(config))


def _discriminator_input_region(proto):
    """(the discriminator's first Conv, the nodes between the S–T networks' outputs and it, the
    nodes where that walk stopped). Walking back from the Conv's input, the walk goes through the
    nodes the method declared fp32 and stops at the first node outside them."""
    from edgestad.export.graph import producers
    from edgestad.export.precision import forced_fp32_nodes
    forced = forced_fp32_nodes(proto)
    produced_by = producers(proto)
    first = next(n for n in proto.graph.node if n.op_type == "Conv" and n.name in forced)
    region, boundary, stack = set(), set(), [first.input[0]]
    while stack:
        node = produced_by.get(stack.pop())
        if node is None or node.op_type == "Constant" or node.name in region:
            continue
        if node.name not in forced:
            boundary.add(node.name)
            continue
        region.add(node.name)
        stack.extend(node.input)
    return first, region, boundary


def test_fp16_graph_keeps_distance_maps_and_discriminator_input_fp32(exported):
    from edgestad.export.precision import fp16_split, forced_fp32_nodes, to_fp16
    first, region, boundary = _discriminator_input_region(exported)
    ops = {n.op_type for n in exported.graph.node if n.name in region}
    assert {"ReduceL2", "ReduceSum", "Sub", "Resize"} <= ops, ops   # norms, Σ over channels, upsampling
    # the walk stopped only at the networks' feature outputs: a block's last Conv or residual Add
    # (12 features: 3 levels × teacher 1, student 1, teacher 2, student 2)
    # (Shape nodes only read the features' shapes for the normalisation's Expand)
    kinds = [n.op_type for n in exported.graph.node if n.name in boundary]
    assert set(kinds) <= {"Conv", "Add", "Shape"}, kinds
    assert len([k for k in kinds if k != "Shape"]) == 12
    split = fp16_split(exported)
    fp32 = set(split.fp32_nodes)
    assert first.name in fp32
    assert region <= fp32, sorted(region - fp32)[:5]
    assert region <= forced_fp32_nodes(exported)
    # in the converted graph the discriminator's first Conv reads float32 data and weights
    converted, info = to_fp16(exported)
    from edgestad.export.graph import tensor_types
    types = tensor_types(converted)
    conv = next(n for n in converted.graph.node if n.name == first.name)
    assert types[conv.input[0]] == 1 and types[conv.input[1]] == 1    # TensorProto.FLOAT
    assert info["fp16_nodes"] > 0


def test_int8_graph_does_not_quantize_the_discriminator_input(exported):
    from edgestad.export.precision import to_int8
    first, region, boundary = _discriminator_input_region(exported)
    calibration = np.random.default_rng(0).integers(0, 256, (2, 3, *SIZE), dtype=np.uint8)
    quantized, info = to_int8(exported, calibration)
    produced_by = {o: n for n in quantized.graph.node for o in n.output}
    conv = next(n for n in quantized.graph.node if n.name == first.name)
    assert produced_by[conv.input[0]].op_type != "DequantizeLinear"
    assert region <= {n.name for n in quantized.graph.node}      # no distance-map node replaced
    # Inside the region nothing is quantized: no QuantizeLinear reads a region node's output, and
    # a region node reads a DequantizeLinear only where it takes a network's feature output (that
    # tensor also feeds the network's next Conv, whose Q/DQ pair the quantizer shares).
    by_name = {n.name: n for n in quantized.graph.node}
    region_outputs = {o for name in region for o in by_name[name].output}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in region_outputs
                   for n in quantized.graph.node)
    feature_outputs = {o for name in boundary for o in by_name[name].output}
    for name in region:
        for i in by_name[name].input:
            source = produced_by.get(i)
            if source is not None and source.op_type == "DequantizeLinear":
                assert produced_by[source.input[0]].input[0] in feature_outputs, name
    assert info["quantized_convs"] > 0
