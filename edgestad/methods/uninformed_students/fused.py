"""Teacher and students of one scale as ONE network (a cost lever for GPUs).

Uninformed Students runs, per scale, a teacher and M students that share one layer table
(``patchnet.ARCHITECTURES``) but not their weights. Run separately, the backend launches
(M+1)·(layers) small convolutions and reads the same normalised image M+1 times. Fused:

- the first convolution stacks the M+1 filter banks: one conv with (M+1)·C outputs reads the
  image once;
- every later convolution, and the final 1×1, is a grouped convolution with groups = M+1, whose
  group g holds network g's weights (group 0 = the teacher), so no network sees another's features;
- poolings and dilations are the ones of ``patchnet.DenseLayerStack._run`` (strided ``max_pool2d`` for the first
  k poolings, ``shifted_max_pool`` + dilation for the rest), applied to all channels at once.

The output is split back into the teacher descriptors (N×d×h×w) and the student descriptors
(M×N×d×h×w), so it is a drop-in for the separate networks (equal to them up to float rounding;
tested in tests/test_fused.py). The per-channel descriptor normalisation of the teacher, (t − μ)/σ,
is an affine map after a linear layer, so ``FusedUninformedStudents`` folds it into the teacher's
group of the final 1×1 conv.

Whether fusion is faster depends on the backend: grouped convolutions are one kernel on cuDNN /
TensorRT, but some CPU backends execute them group by group. ``edgestad bench`` and
studies/speed.py measure both forms; the README quotes what was measured.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .patchnet import DenseLayerStack, PatchNet
from .model import (StudentTeacherScoring, UninformedStudents,
                                  ensemble_error_and_variance)


class FusedPatchEnsemble(DenseLayerStack):
    """G = M+1 patch networks of one layout evaluated as one network with grouped convolutions.

    ``dense(image, dense_stride)`` returns (teacher N×d×h×w, students M×N×d×h×w) with exactly the
    sampling and padding of ``PatchNet.dense``.
    """

    def __init__(self, patch_size: int, num_networks: int, descriptor_dim: int, width: int,
                 leaky_slope: float, in_channels: int = 3):
        super().__init__()
        template = PatchNet(patch_size, descriptor_dim, width, leaky_slope, in_channels)
        self.patch_size = patch_size
        self.num_networks = num_networks
        self.descriptor_dim = descriptor_dim
        self.leaky_slope = leaky_slope
        self.layout = template.layout
        g = num_networks
        convs = []
        for i, conv in enumerate(template.convs):
            # First layer: all networks read the same image → plain conv with stacked filters.
            # Later layers: network g only reads its own channels → groups = G.
            groups = 1 if i == 0 else g
            in_ch = conv.in_channels if i == 0 else conv.in_channels * g
            convs.append(nn.Conv2d(in_ch, conv.out_channels * g, conv.kernel_size, groups=groups))
        self.convs = nn.ModuleList(convs)

    @classmethod
    def from_nets(cls, teacher: PatchNet, students: Sequence[PatchNet],
                  teacher_affine: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> "FusedPatchEnsemble":
        """Stack the weights of a teacher and its students (all of one layout).

        ``teacher_affine=(mean, std)`` folds (t − mean)/std into the teacher's final 1×1 filters so
        the fused network emits normalised teacher descriptors directly.
        """
        nets = [teacher, *students]
        first = nets[0]
        for net in nets[1:]:
            if (net.patch_size, net.descriptor_dim, net.width, net.leaky_slope) != (
                    first.patch_size, first.descriptor_dim, first.width, first.leaky_slope):
                raise ValueError("all networks of a fused ensemble need the same patch size, "
                                 "descriptor_dim, width and leaky_slope")
        fused = cls(first.patch_size, len(nets), first.descriptor_dim, first.width,
                    first.leaky_slope, in_channels=first.convs[0].in_channels)
        last = len(first.convs) - 1
        with torch.no_grad():
            for i, conv in enumerate(fused.convs):
                weights = [net.convs[i].weight for net in nets]
                biases = [net.convs[i].bias for net in nets]
                if i == last and teacher_affine is not None:
                    mean, std = (t.reshape(-1).to(weights[0]) for t in teacher_affine)
                    weights[0] = weights[0] / std.view(-1, 1, 1, 1)
                    biases[0] = (biases[0] - mean) / std
                conv.to(weights[0].dtype)
                conv.weight.copy_(torch.cat(weights, 0))
                conv.bias.copy_(torch.cat(biases, 0))
        return fused.to(first.convs[0].weight.device)

    def dense(self, image: torch.Tensor, dense_stride: int = 1, padding_mode: str = "reflect"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher N×d×h×w, students M×N×d×h×w); sampling as in ``PatchNet.dense``."""
        out = super().dense(image, dense_stride, padding_mode)
        d = self.descriptor_dim
        n, _, rows, cols = out.shape
        teacher = out[:, :d]
        students = out[:, d:].reshape(n, self.num_networks - 1, d, rows, cols).transpose(0, 1)
        return teacher, students


class FusedUninformedStudents(StudentTeacherScoring):
    """``UninformedStudents`` with one fused ensemble per scale: same forward, same outputs.

    Built from a (trained) model; copies its input, descriptor and score statistics. The teacher's
    descriptor normalisation is folded into the fused final conv.
    """

    def __init__(self, model: UninformedStudents):
        super().__init__()
        self.config = model.config
        c = model.config
        self.init_input(model.input_mean.flatten().tolist(), model.input_std.flatten().tolist())
        ensembles = {}
        for p in c.patch_sizes:
            mean, std = model.descriptor_stats(p)
            ensembles[str(p)] = FusedPatchEnsemble.from_nets(
                model.teachers[str(p)], list(model.students[str(p)]), teacher_affine=(mean, std))
            self.register_buffer(f"score_stats_{p}",
                                 getattr(model, f"score_stats_{p}").detach().clone())
        self.ensembles = nn.ModuleDict(ensembles)
        self.to(model.input_mean.dtype)      # a float64 model (tests) gives a float64 fused form

    def error_and_variance(self, x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """e (eq. 9) and v (eq. 10), N×h×w each, as in ``UninformedStudents.error_and_variance``."""
        target, preds = self.ensembles[str(p)].dense(x, self.config.dense_stride,
                                                     self.config.padding_mode)
        return ensemble_error_and_variance(target, preds)


def fuse_model(model: nn.Module) -> nn.Module:
    """The fused form of an ``UninformedStudents`` model (other methods are returned unchanged).

    The hook for callers (export, bench): ``fuse_model(load_model(bundle)).eval()``.
    """
    if isinstance(model, UninformedStudents):
        return FusedUninformedStudents(model).eval()
    return model
