"""The teachers that ship inside the package: integrity, architecture, and a quality check."""
import json

import pytest
import torch

from edgestad.files import sha256_file
from edgestad.methods.uninformed_students.patchnet import PatchNet, receptive_field
from edgestad.methods.uninformed_students.teachers import load_teacher
from edgestad.methods.uninformed_students.teachers import shipped_teacher_path
from edgestad.methods.uninformed_students.teacher import mean_abs_offdiag_correlation
from edgestad.methods.common.settings import IMAGENET_MEAN, IMAGENET_STD

INDEX = shipped_teacher_path(17).parent / "teachers.json"


def _fixed_natural_image():
    skimage_data = pytest.importorskip("skimage.data")
    import cv2
    img = cv2.resize(skimage_data.astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("p", [17, 33, 65])
def test_shipped_teacher(p):
    path = shipped_teacher_path(p)
    assert path.is_file(), f"shipped teacher missing: {path}"
    index = json.loads(INDEX.read_text())
    assert sha256_file(path) == index[str(p)]["sha256"]
    net, meta = load_teacher(path)
    assert net.patch_size == p
    assert receptive_field(p) == {17: 17, 33: 33, 65: 60}[p]
    assert meta["iterations"] == index[str(p)]["iterations"] > 0
    x = _fixed_natural_image()
    with torch.no_grad():
        desc = net.dense(x, dense_stride=2)
        assert torch.isfinite(desc).all()
        flat = desc.permute(0, 2, 3, 1).reshape(-1, desc.shape[1])
        trained = mean_abs_offdiag_correlation(flat)
        torch.manual_seed(0)
        untrained = PatchNet(p, net.descriptor_dim, net.width, net.leaky_slope).eval()
        d0 = untrained.dense(x, dense_stride=2)
        random_init = mean_abs_offdiag_correlation(d0.permute(0, 2, 3, 1).reshape(-1, d0.shape[1]))
    # Pretraining with L_c must leave the descriptors far less correlated than a random network.
    assert trained < 0.6 * random_init, (trained, random_init)
    assert trained < 0.2
