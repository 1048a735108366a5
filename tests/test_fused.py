"""The fused teacher+students network must equal the separate networks it was built from."""
import pytest
import torch

from edgestad.methods.uninformed_students.fused import FusedPatchEnsemble, FusedUninformedStudents, fuse_model
from edgestad.methods.uninformed_students.patchnet import PatchNet, num_poolings
from edgestad.methods.uninformed_students.model import UninformedStudentsConfig as StudentTeacherConfig, UninformedStudents

CASES = [(p, s) for p in (17, 33, 65) for s in (1, 2, 4) if s <= 2 ** num_poolings(p)]


def _nets(p, students=3, seed=0):
    torch.manual_seed(seed)
    return [PatchNet(p, descriptor_dim=6, width=4).double().eval() for _ in range(students + 1)]


@pytest.mark.parametrize("p,stride", CASES)
def test_fused_ensemble_equals_separate_networks(p, stride):
    teacher, *students = _nets(p)
    fused = FusedPatchEnsemble.from_nets(teacher, students).eval()
    image = torch.randn(2, 3, 41, 37, dtype=torch.float64)
    t, s = fused.dense(image, stride)
    assert t.shape == teacher.dense(image, stride).shape
    assert s.shape == (3, *t.shape)
    assert torch.allclose(t, teacher.dense(image, stride), atol=1e-10, rtol=0)
    for i, student in enumerate(students):
        assert torch.allclose(s[i], student.dense(image, stride), atol=1e-10, rtol=0)


def test_fused_layers_are_one_stacked_conv_then_grouped_convs():
    teacher, *students = _nets(33)
    fused = FusedPatchEnsemble.from_nets(teacher, students)
    assert len(fused.convs) == len(teacher.convs)
    assert fused.convs[0].groups == 1 and fused.convs[0].out_channels == 4 * 4
    assert all(c.groups == 4 for c in fused.convs[1:])
    assert fused.convs[-1].out_channels == 4 * 6 and fused.convs[-1].kernel_size == (1, 1)


def test_teacher_normalisation_folds_into_the_final_conv():
    teacher, *students = _nets(17)
    mean = torch.randn(1, 6, 1, 1, dtype=torch.float64)
    std = torch.rand(1, 6, 1, 1, dtype=torch.float64) + 0.5
    fused = FusedPatchEnsemble.from_nets(teacher, students, teacher_affine=(mean, std))
    image = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    t, _ = fused.dense(image, 1)
    assert torch.allclose(t, (teacher.dense(image, 1) - mean) / std, atol=1e-10, rtol=0)


def test_mismatched_networks_are_refused():
    with pytest.raises(ValueError, match="same patch size"):
        FusedPatchEnsemble.from_nets(PatchNet(17, 6, 4), [PatchNet(17, 6, 8)])


def _model(patch_sizes, stride):
    torch.manual_seed(1)
    config = StudentTeacherConfig(patch_sizes=patch_sizes, num_students=3, descriptor_dim=6,
                                  width=4, dense_stride=stride, input_size=(48, 45))
    model = UninformedStudents(config).double().eval()
    for p in patch_sizes:   # non-trivial statistics, so copying/folding them is tested too
        getattr(model, f"descriptor_mean_{p}").normal_()
        getattr(model, f"descriptor_std_{p}").uniform_(0.5, 2.0)
        getattr(model, f"score_stats_{p}").copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    return model


@pytest.mark.parametrize("patch_sizes,stride", [((17, 33, 65), 1), ((17, 33, 65), 2),
                                                ((65,), 4), ((65,), 8), ((33,), 4)])
def test_fused_model_outputs_equal_the_model(patch_sizes, stride):
    model = _model(patch_sizes, stride)
    fused = FusedUninformedStudents(model).eval()
    images = torch.randint(0, 256, (2, 3, 48, 45), dtype=torch.uint8)
    with torch.no_grad():
        expected_map, expected_score = model(images)
        fused_map, fused_score = fused(images)
    assert fused_map.shape == expected_map.shape == (2, 1, 48, 45)
    assert torch.allclose(fused_map, expected_map, atol=1e-10, rtol=0)
    assert torch.allclose(fused_score, expected_score, atol=1e-10, rtol=0)


def test_fuse_model_passes_other_methods_through():
    other = torch.nn.Identity()
    assert fuse_model(other) is other
    assert isinstance(fuse_model(_model((17,), 1)), FusedUninformedStudents)
