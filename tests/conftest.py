"""Shared fixtures: a tiny demo dataset and tiny teachers, built once per test session."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from edgestad.demo_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "brick", size=64, n_train=14,
                             n_test_good=4, n_test_defect=6, seed=0)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory, tiny_dataset) -> dict:
    """p → teacher file: width 4, d 8, a few iterations on the demo photos (real P network)."""
    torch = pytest.importorskip("torch")
    from edgestad.images import list_images
    from edgestad.methods.uninformed_students.teacher import TeacherConfig, pretrain_teacher
    out = tmp_path_factory.mktemp("teachers")
    images = list_images(tiny_dataset / "train" / "good")
    torch.set_num_threads(2)
    files = {}
    for p in (17, 33):
        cfg = TeacherConfig(patch_size=p, descriptor_dim=8, width=4, iterations=3, batch_size=8,
                            cnn_input_size=32)
        files[p] = pretrain_teacher(images, out, cfg, progress=False)
    return files
