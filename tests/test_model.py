"""UninformedStudents: the scoring math of eq. 8-12 and the in-graph upsampling."""
import torch

from edgestad.methods import build_model
from edgestad.methods.uninformed_students.model import UninformedStudentsConfig as StudentTeacherConfig, UninformedStudents


def _model(patch_sizes=(17,), **kw):
    torch.manual_seed(0)
    cfg = StudentTeacherConfig(patch_sizes=patch_sizes, num_students=3, descriptor_dim=5, width=4,
                               input_size=(40, 40), **kw)
    return UninformedStudents(cfg).double().eval()


def test_error_and_variance_follow_the_paper():
    model = _model()
    mean, std = model.descriptor_stats(17)
    mean.copy_(torch.randn_like(mean))
    std.copy_(torch.rand_like(std) + 0.5)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    e, v = model.error_and_variance(x, 17)
    t = (model.teachers["17"].dense(x) - mean) / std
    s = [st.dense(x) for st in model.students["17"]]
    mu = sum(s) / 3
    assert torch.allclose(e, ((mu - t) ** 2).sum(1), atol=1e-12)
    # eq. 10: v = mean_i ||μ_i||² − ||μ||²
    v_paper = sum((si ** 2).sum(1) for si in s) / 3 - (mu ** 2).sum(1)
    assert torch.allclose(v, v_paper, atol=1e-10)
    assert e.shape == v.shape == (2, 40, 40)


def test_forward_normalises_and_fuses_scales():
    torch.manual_seed(1)
    cfg = StudentTeacherConfig(patch_sizes=(17, 33), num_students=2, descriptor_dim=4, width=4,
                               input_size=(48, 48))
    model = UninformedStudents(cfg).double().eval()
    model.score_stats_17.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    amap, score = model(images)
    assert amap.shape == (2, 1, 48, 48) and score.shape == (2,)
    x = model.normalize_input(images)
    expected = 0
    for p in (17, 33):
        e, v = model.error_and_variance(x, p)
        st = getattr(model, f"score_stats_{p}")
        expected = expected + (e - st[0]) / st[1] + (v - st[2]) / st[3]
    assert torch.allclose(amap[:, 0], expected / 2, atol=1e-10)
    assert torch.equal(score, amap.amax(dim=(1, 2, 3)))


def test_strided_map_is_interpolated_through_the_exact_samples():
    model = _model((33,), dense_stride=4)
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    amap, _ = model(images)
    grid = model.scale_score(model.normalize_input(images), 33)
    assert amap.shape == (1, 1, 40, 40)
    assert grid.shape[-2:] == model.grid_shape(40, 40) == (11, 11)
    # pixel (4i, 4j) of the map is sample (i, j): the interpolation passes through the samples
    assert torch.allclose(amap[0, 0, ::4, ::4], grid[0, :10, :10], atol=1e-12)
    exact = _model((33,), dense_stride=1)
    exact.load_state_dict(model.state_dict())
    full, _ = exact(images)
    assert torch.allclose(full[0, 0, ::4, ::4], amap[0, 0, ::4, ::4], atol=1e-10)


def test_build_model_rejects_unknown_method_and_keys():
    import pytest
    with pytest.raises(ValueError, match="unknown method"):
        build_model("padim", {})
    with pytest.raises(ValueError, match="unknown method_config keys"):
        build_model("uninformed_students", {"students": 3})


def test_dense_stride_beyond_a_scales_stride_fails_before_training():
    import pytest
    with pytest.raises(ValueError, match="p=17"):
        UninformedStudents(StudentTeacherConfig(patch_sizes=(17, 33), dense_stride=4))
