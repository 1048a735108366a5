"""The fast dense network must equal the patch network applied crop by crop (Bailer et al.)."""
import pytest
import torch
import torch.nn.functional as F

from edgestad.methods.uninformed_students.patchnet import (ARCHITECTURES, PatchNet, receptive_field, shifted_max_pool,
                                      strided_pools_for)


def _net(p, seed=0):
    torch.manual_seed(seed)
    return PatchNet(p, descriptor_dim=6, width=4).double().eval()


@pytest.mark.parametrize("p", sorted(ARCHITECTURES))
def test_patch_network_maps_a_patch_to_one_descriptor(p):
    net = _net(p)
    out = net(torch.randn(2, 3, p, p, dtype=torch.float64))
    assert out.shape == (2, 6, 1, 1)


def test_receptive_fields():
    # p=17 and p=33 are exact; p=65 is the paper's Table 4, whose floor poolings use 60×60 pixels.
    assert receptive_field(17) == 17
    assert receptive_field(33) == 33
    assert receptive_field(65) == 60


@pytest.mark.parametrize("p", [17, 33])
def test_descriptor_depends_on_exactly_p_by_p_pixels(p):
    net = _net(p)
    patch = torch.randn(1, 3, p, p, dtype=torch.float64)
    base = net(patch)
    for r, c in [(0, 0), (p - 1, p - 1), (0, p - 1), (p // 2, p // 2)]:
        # Max-pooling can hide a change of one sign, so try both; large enough to win a pooling.
        changes = []
        for delta in (100.0, -100.0):
            changed = patch.clone()
            changed[..., r, c] += delta
            changes.append(not torch.equal(net(changed), base))
        assert any(changes), (r, c)
    outside = torch.randn(1, 3, p + 1, p + 1, dtype=torch.float64)
    inner = net(outside[..., :p, :p])
    outside[..., p, :] += 100.0
    outside[..., :, p] += 100.0
    assert torch.equal(net(outside)[..., :1, :1], inner)


@pytest.mark.parametrize("p", sorted(ARCHITECTURES))
def test_dense_output_equals_patch_network_on_every_crop(p):
    net = _net(p)
    image = torch.randn(1, 3, 70, 67, dtype=torch.float64)
    dense = net.dense(image, dense_stride=1)
    assert dense.shape == (1, 6, 70, 67)          # padded so the map has the input's size
    padded = F.pad(image, (p // 2, p, p // 2, p), mode="reflect")
    positions = [(r, c) for r in range(0, 70, 7) for c in range(0, 67, 11)] + [(69, 66), (0, 66)]
    for r, c in positions:
        crop = padded[..., r:r + p, c:c + p]
        assert torch.allclose(net(crop)[..., 0, 0], dense[..., r, c], atol=1e-10, rtol=0), (r, c)


@pytest.mark.parametrize("p", sorted(ARCHITECTURES))
def test_dense_stride_samples_the_exact_dense_map(p):
    net = _net(p, seed=1)
    h, w = 90, 85
    image = torch.randn(1, 3, h, w, dtype=torch.float64)
    exact = net.dense(image, dense_stride=1)
    padded = F.pad(image, (p // 2, p + 8, p // 2, p + 8), mode="reflect")
    for k in range(1, net.num_poolings + 1):
        s = 2 ** k
        sampled = net.dense(image, dense_stride=s)
        # ceil((H-1)/s)+1 samples: the last one lies at or past the last pixel
        assert sampled.shape[-2:] == ((h - 1 + s - 1) // s + 1, (w - 1 + s - 1) // s + 1)
        rows, cols = (h - 1) // s + 1, (w - 1) // s + 1      # samples inside the image
        assert torch.allclose(sampled[..., :rows, :cols], exact[..., ::s, ::s],
                              atol=1e-10, rtol=0)
        # a sample past the image border is still T̂ of its (padded) crop
        r, c = (sampled.shape[-2] - 1) * s, (sampled.shape[-1] - 1) * s
        crop = padded[..., r:r + p, c:c + p]
        assert torch.allclose(net(crop)[..., 0, 0], sampled[..., -1, -1], atol=1e-10, rtol=0)


def test_shifted_max_pool_equals_dilated_max_pool():
    x = torch.randn(2, 3, 19, 23, dtype=torch.float64)
    for d in (1, 2, 4):
        assert torch.equal(shifted_max_pool(x, d), F.max_pool2d(x, 2, stride=1, dilation=d))


def test_bad_dense_stride_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        strided_pools_for(3, 3)
    with pytest.raises(ValueError, match="exceeds"):
        strided_pools_for(16, 3)
    with pytest.raises(ValueError, match="patch_size"):
        PatchNet(21)
