"""The global branch and the fused image score (methods/common/global_score.py), the training
augmentation and its automatic choice (train/augment.py)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from edgestad.methods import build_model, get_method  # noqa: E402
from edgestad.methods.common.global_score import (ScoreFusion, fit_global_branch,  # noqa: E402
                                                  fused_scores, mahalanobis, normalization_of, pooled)

SIZE = (64, 64)


def _stfpm(**values):
    method = get_method("stfpm")
    return method.build(method.make_config(input_size=SIZE, **values)).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *SIZE), generator=g, dtype=torch.uint8)


def test_global_score_is_the_ledoit_wolf_mahalanobis_distance_in_float64():
    from sklearn.covariance import LedoitWolf
    model = _stfpm(global_levels=(16, 32))
    train, val, test = _images(24, 0), _images(6, 1), _images(3, 2)
    info = fit_global_branch(model, train, None, val, None, "cpu")
    assert info["levels"] == [16, 32] and info["train_images"] == 24
    with torch.no_grad():
        _, _, got = model.scores(test)
        teacher = model.teacher_levels(model.normalize_input(train))
        test_teacher = model.teacher_levels(model.normalize_input(test))
    expected = np.zeros(3)
    for stride in (16, 32):
        feats = teacher[stride].double().mean(dim=(2, 3)).numpy()
        lw = LedoitWolf().fit(feats)
        d = test_teacher[stride].double().mean(dim=(2, 3)).numpy() - lw.location_
        expected += np.sqrt((d @ lw.precision_ * d).sum(1))
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-3)
    # the studies' numpy twin of the graph's distance, on the graph's own fitted buffers
    gaussian = model.global_gaussian
    twin = sum(mahalanobis(test_teacher[stride].double().mean(dim=(2, 3)).numpy(),
                           getattr(gaussian, f"mean{i}").double().numpy(),
                           getattr(gaussian, f"precision{i}").double().numpy())
               for i, stride in enumerate((16, 32)))
    np.testing.assert_allclose(twin, got.numpy(), rtol=1e-4)


def test_fusion_normalises_each_score_on_validation_goods():
    assert _stfpm().config.score_normalization == "quantile"      # the default (EfficientAD's)
    model = _stfpm(score_normalization="z")
    train, val = _images(16, 3), _images(8, 4)
    info = fit_global_branch(model, train, None, val, None, "cpu")
    with torch.no_grad():
        _, m, g = model.scores(val)
        _, fused = model(val)
    # z normalisation: each part has mean 0 and std 1 on the validation goods
    norm = model.score_fusion.norm.tolist()
    z_map, z_global = (m.numpy() - norm[0]) / norm[1], (g.numpy() - norm[2]) / norm[3]
    assert abs(z_map.mean()) < 1e-4 and abs(z_global.mean()) < 1e-4
    assert np.std(z_map, ddof=1) == pytest.approx(1, rel=1e-3)
    np.testing.assert_allclose(fused.numpy(), z_map + z_global, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused.numpy(), fused_scores(m.numpy(), g.numpy(), norm, "sum"),
                               rtol=1e-4, atol=1e-5)
    assert info["fusion"]["rule"] == "sum" and info["fusion"]["normalization"] == "z"


def test_quantile_normalisation_and_max_rule():
    scores = np.arange(1, 1001, dtype=np.float64)
    offset, scale = normalization_of(scores, "quantile")
    q9, q995 = np.quantile(scores, 0.9), np.quantile(scores, 0.995)
    assert (q9 - offset) / scale == pytest.approx(0.0)
    assert (q995 - offset) / scale == pytest.approx(0.1)      # EfficientAD's 0 and 0.1
    fusion = ScoreFusion("max")
    fusion.norm.copy_(torch.tensor([1.0, 2.0, 10.0, 5.0]))
    out = fusion(torch.tensor([3.0, 1.0]), torch.tensor([10.0, 20.0]))
    assert out.tolist() == pytest.approx([1.0, 2.0])


def test_letterbox_pooling_averages_only_the_image():
    f = torch.zeros(1, 2, 4, 4)
    f[..., :2, :] = 1.0                           # the image's half
    f[..., 2:, :] = 100.0                         # padding
    valid = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    valid[..., :8, :] = True
    assert pooled(f, valid).tolist() == [[1.0, 1.0]]
    assert pooled(f, None).tolist() == [[50.5, 50.5]]


def test_branch_off_scores_with_the_map_and_older_bundles_load_without_it():
    model = _stfpm(global_branch=False)
    assert not model.has_global_branch
    assert not any(k.startswith(("global_gaussian", "score_fusion")) for k in model.state_dict())
    # a bundle written before the branch existed has no global_branch key: the map alone
    config = {"backbone": "efficientnet-lite0", "levels": [4, 8, 16], "input_size": [64, 64],
              "image_score": "max", "resize": "area_or_linear"}
    old = build_model("stfpm", config)
    assert not old.has_global_branch and old.config.map_sigma == 0.0
    assert old.teacher.strides == (4, 8, 16)


def test_the_branch_shares_the_teacher_pass_and_is_declared_fp32():
    model = _stfpm(global_levels=(16, 32))
    assert model.teacher.strides == (4, 8, 16, 32)     # one teacher for the map and the branch
    assert model.student.strides == (4, 8, 16)
    method = get_method("stfpm")
    assert {"global_gaussian", "score_fusion"} <= set(method.fp32_modules(model.config))


@pytest.mark.parametrize("values, option", [
    ({"global_levels": (64,)}, "global_levels"),
    ({"global_levels": (32, 16)}, "global_levels"),
    ({"score_fusion": "mean"}, "score_fusion"),
    ({"score_normalization": "minmax"}, "score_normalization"),
])
def test_bad_global_settings_name_the_setting(values, option):
    with pytest.raises(ValueError, match=option):
        get_method("stfpm").make_config(**values)


def test_rotate_augmentation_turns_and_flips_from_the_loop_generator():
    from edgestad.methods.common.training import augment_batch
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4).repeat(8, 1, 1, 1)
    out = augment_batch(x, "rotate", torch.Generator().manual_seed(0))
    again = augment_batch(x, "rotate", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                               # resumable: same draws
    variants = {tuple(torch.rot90(v, k, (-2, -1)).flatten().tolist())
                for v in (x[0], x[0].flip(-1)) for k in range(4)}
    assert all(tuple(o.flatten().tolist()) in variants for o in out[::2])
    assert len({tuple(o.flatten().tolist()) for o in out[::2]}) > 1
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)


def _bars(angles) -> np.ndarray:
    import cv2
    out = []
    for a in angles:
        img = np.zeros((96, 96, 3), np.uint8)
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        p0 = (int(48 - 40 * c), int(48 - 40 * s))
        p1 = (int(48 + 40 * c), int(48 + 40 * s))
        cv2.line(img, p0, p1, (255, 255, 255), 9)
        out.append(img)
    return np.stack(out)


def test_auto_augmentation_turns_on_rotation_only_for_parts_at_any_angle():
    from edgestad.train.augment import choose_augmentation
    rng = np.random.default_rng(0)
    assert choose_augmentation(_bars(rng.uniform(0, 180, 30)))[0] == "rotate"
    assert choose_augmentation(_bars(rng.normal(20, 3, 30)))[0] == "none"
    assert choose_augmentation(_bars(rng.normal(20, 3, 30)), otherwise="flip")[0] == "flip"


def test_a_checkpoint_without_the_branch_resumes_into_a_model_with_it(tmp_path):
    """The branch is fitted after training from the frozen teacher: a run resumed from a checkpoint
    written without it (or with other levels) continues, and its students are the same."""
    from edgestad.methods.base import FitContext
    method = get_method("stfpm")
    images = _images(8, 5).permute(0, 2, 3, 1).numpy()
    ck = tmp_path / "ck.pt"

    def fit(**values):
        torch.manual_seed(0)
        model = method.build(method.make_config(input_size=SIZE, **values))
        ctx = FitContext(epochs=2, batch_size=4, lr=0.1, checkpoint=ck, progress=False)
        return model, method.fit(model, images, ctx)

    off, history = fit(global_branch=False)
    on, resumed = fit(global_branch=True, global_levels=(16, 32))     # resumes at epoch 2 of 2
    assert resumed == history
    for key, value in off.student.state_dict().items():
        assert torch.equal(value, on.student.state_dict()[key]), key
    assert on.teacher.strides == (4, 8, 16, 32)


def test_train_records_the_branch_and_evaluate_shows_each_part(tiny_dataset, tmp_path):
    import json
    from click.testing import CliRunner
    from edgestad.bundle import load_bundle
    from edgestad.cli import main
    bundle = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(bundle), "--epochs", "1",
                                  "--batch-size", "4", "--input-size", "64", "--augment", "auto"])
    assert r.exit_code == 0, r.output
    manifest = load_bundle(bundle).manifest
    choice = manifest["provenance"]["augment_auto"]            # what auto chose, and why
    assert choice["augment"] in ("none", "rotate") and "orientation resultant" in choice["why"]
    assert manifest["provenance"]["training"]["options"]["augment"] == choice["augment"]
    branch = manifest["global_branch"]
    assert branch["levels"] == list(manifest["method_config"]["global_levels"])
    assert branch["fusion"]["rule"] == manifest["method_config"]["score_fusion"]
    assert "global Gaussian" in manifest["outputs"]["image_score"]
    r = CliRunner().invoke(main, ["evaluate", str(bundle), str(tiny_dataset), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    parts = report["image_score_parts"]
    assert set(parts) == {"map", "global", "fused"}
    assert parts["fused"]["image_auroc"] == report["image_auroc"]
    assert "image score part global" in r.output
    d = report["decisions_at_bundle_threshold"]
    assert d["promised_good_rejected"] == manifest["thresholds"]["rule"]["image_promised_false_reject"]
