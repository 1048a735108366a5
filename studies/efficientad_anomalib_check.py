"""Is our EfficientAD-S peer (bench/efficientad.py) the same function as anomalib's?

    python -m venv /tmp/anomalib-env
    /tmp/anomalib-env/bin/pip install "torch==2.14.1" "torchvision==0.29.1" anomalib
    /tmp/anomalib-env/bin/python studies/efficientad_anomalib_check.py

anomalib is not a dependency of edgestad (it pulls a different torch and the CUDA wheels), so this
runs in its own environment. It builds anomalib's ``EfficientAdModel`` (model size S, padding off,
pad_maps on: anomalib's defaults), gives it random weights and non-trivial teacher statistics and
map quantiles, copies every tensor into ``EfficientADS`` in order (same shapes required), and
compares the two on the same random images: anomaly maps, image scores, parameter counts and the
counted GFLOP/frame. Writes studies/results/efficientad_anomalib_check.json.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    import anomalib
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
    from torch.utils.flop_counter import FlopCounterMode

    from edgestad.bench.efficientad import EfficientADS

    torch.manual_seed(0)
    theirs = EfficientAdModel(model_size="small").eval()
    with torch.no_grad():
        theirs.mean_std["mean"].copy_(torch.randn(1, 384, 1, 1))
        theirs.mean_std["std"].copy_(torch.rand(1, 384, 1, 1) + 0.5)
        for key, value in zip(("qa_st", "qb_st", "qa_ae", "qb_ae"), (0.1, 2.0, 0.2, 3.0)):
            theirs.quantiles[key].fill_(value)
    ours = EfficientADS((256, 256)).eval()

    # Networks: same tensors in the same order (teacher, student, encoder, decoder).
    nets_theirs = [p for name, p in theirs.named_parameters()
                   if not name.startswith(("mean_std", "quantiles"))]
    nets_ours = list(ours.parameters())
    shapes_equal = [tuple(a.shape) for a in nets_theirs] == [tuple(b.shape) for b in nets_ours]
    if not shapes_equal:
        print("parameter shapes differ:", [tuple(a.shape) for a in nets_theirs],
              [tuple(b.shape) for b in nets_ours])
        return 1
    with torch.no_grad():
        for a, b in zip(nets_theirs, nets_ours):
            b.copy_(a)
        ours.teacher_mean.copy_(theirs.mean_std["mean"])
        ours.teacher_std.copy_(theirs.mean_std["std"])
        ours.quantiles.copy_(torch.stack([theirs.quantiles[k] for k in
                                          ("qa_st", "qb_st", "qa_ae", "qb_ae")]))

    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        out = theirs(images.float() / 255.0)          # anomalib takes 0..1 floats
        map_ours, score_ours = ours(images)           # ours takes 0..255 (uint8)
    map_theirs, score_theirs = out.anomaly_map, out.pred_score.reshape(-1)
    max_rel_map = float((map_ours - map_theirs).abs().max() / map_theirs.abs().max())
    max_rel_score = float(((score_ours - score_theirs).abs() / score_theirs.abs()).max())

    class Wrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).anomaly_map

    def gflops(model, x):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops() / 1e9

    x = torch.rand(1, 3, 256, 256)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "anomalib": anomalib.__version__, "torch": torch.__version__,
        "anomalib_model": "EfficientAdModel(model_size='small', padding=False, pad_maps=True)",
        "parameter_shapes_equal": shapes_equal,
        "parameters": {"anomalib": sum(p.numel() for p in nets_theirs),
                       "edgestad": sum(p.numel() for p in nets_ours)},
        "gflop_per_frame_256": {"anomalib": round(gflops(Wrapped(theirs), x), 3),
                                "edgestad": round(gflops(ours, x * 255), 3)},
        "max_rel_diff_anomaly_map": max_rel_map,
        "max_rel_diff_image_score": max_rel_score,
        "map_shape": list(map_ours.shape),
    }
    path = HERE / "results" / "efficientad_anomalib_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if max_rel_map < 1e-4 and max_rel_score < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
