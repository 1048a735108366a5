"""STFPM-AE: the U-Net auto-encoders' shapes (with the padding at small levels), the frozen epochs
scaled to the run, and the student's BatchNorm statistics recomputed after training."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgestad.methods import get_method  # noqa: E402
from edgestad.methods.base import FitContext  # noqa: E402
from edgestad.methods.stfpm_ae.method import FeatureUNet, frozen_epochs, joint_loss  # noqa: E402


@pytest.mark.parametrize("side,padded", [(16, False), (4, True), (12, True)])
def test_unet_keeps_shape_and_pads_small_levels(side, padded):
    unet = FeatureUNet(24)
    x = torch.randn(2, 24, side, side)
    assert unet(x).shape == x.shape
    # the layout: 3 encoder blocks of two conv3x3, a channel-keeping bottleneck, 3 transposed convs
    assert len(unet.encoder) == 3 and all(len(b) == 4 for b in unet.encoder)
    assert unet.bottleneck[0].in_channels == unet.bottleneck[2].out_channels
    assert all(isinstance(d, torch.nn.ConvTranspose2d) and d.kernel_size == (2, 2) for d in unet.decoder)
    assert (side % 8 != 0) == padded


def test_frozen_epochs_scale_with_the_run():
    assert frozen_epochs(100, {}) == 5          # the reference: 5 of 100
    assert frozen_epochs(20, {}) == 1
    assert frozen_epochs(10, {}) == 1           # at least one epoch in a run of two or more
    assert frozen_epochs(1, {}) == 0
    assert frozen_epochs(20, {"ae_frozen_epochs": 3}) == 3


def test_joint_loss_terms():
    t = [torch.tensor([[[[3.0]], [[4.0]]]])]
    s = [torch.tensor([[[[1.0]], [[1.0]]]])]
    r = [torch.tensor([[[[0.0]], [[2.0]]]])]
    recon, match = joint_loss(t, s, r, alpha=1e-7)
    assert float(recon) == pytest.approx(1e-7 * (1.0 + 1.0))
    assert float(match) == pytest.approx(0.5 * ((0.6 - 0.0) ** 2 + (0.8 - 1.0) ** 2))


def test_autoencoders_frozen_then_trained_and_student_bn_recomputed(tiny_dataset):
    from edgestad.datasets import good_images, load_images
    method = get_method("stfpm_ae")
    torch.manual_seed(0)
    model = method.build(method.make_config(input_size=(64, 64)))
    images = load_images(good_images(tiny_dataset)[:4], (64, 64))
    snapshots = []

    def snapshot(entry):
        snapshots.append((entry["stage"],
                          [p.detach().clone() for p in model.autoencoders.parameters()],
                          model.student.stem[0].weight.detach().clone()))

    ctx = FitContext(epochs=2, batch_size=2, lr=0.4, checkpoint=None, progress=False, log=snapshot,
                     options={"ae_pretrain_epochs": 1, "ae_frozen_epochs": 1})
    method.fit(model, images, ctx)
    assert [s[0] for s in snapshots] == ["ae_pretrain", "joint (AEs frozen)", "joint"]
    pre, frozen, joint = snapshots
    assert all(torch.equal(a, b) for a, b in zip(pre[1], frozen[1]))        # frozen epoch
    assert not torch.equal(pre[2], frozen[2])                                # student trained
    assert any(not torch.equal(a, b) for a, b in zip(frozen[1], joint[1]))  # then AEs trained
    assert ctx.provenance["batchnorm_recomputed"]["images"] == 4
    bn = model.student.stem[1]
    outputs = []
    hook = model.student.stem[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        model.student(model.normalize_input(torch.from_numpy(images).permute(0, 3, 1, 2)))
    hook.remove()
    assert torch.allclose(bn.running_mean, outputs[0].mean(dim=(0, 2, 3)), atol=1e-5)
