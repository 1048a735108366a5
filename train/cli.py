"""Click commands of the training stage: `edgestad pretrain-teacher` and `edgestad train`."""
from __future__ import annotations

import json
from pathlib import Path

import click


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return name


@click.command("pretrain-teacher")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output folder (resumes from its checkpoint_p<P>.pt when present).")
@click.option("-p", "--patch-size", type=click.Choice(["17", "33", "65"]), default="65",
              show_default=True, help="Receptive field p of the teacher.")
@click.option("--iterations", type=int, default=50_000, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--descriptor-dim", type=int, default=128, show_default=True)
@click.option("--width", type=int, default=128, show_default=True)
@click.option("--lambda-k", type=float, default=1.0, show_default=True, help="Distillation weight.")
@click.option("--lambda-m", type=float, default=0.0, show_default=True, help="Triplet loss weight.")
@click.option("--lambda-c", type=float, default=1.0, show_default=True, help="Decorrelation weight.")
@click.option("--pretrained-cnn", type=click.Choice(["efficientnet-lite0", "resnet18"]),
              default="efficientnet-lite0", show_default=True, help="The pretrained network P.")
@click.option("--cnn-weights", type=click.Path(dir_okay=False), default=None,
              help="Local weights file of P (required for resnet18).")
@click.option("--cnn-input-size", type=int, default=224, show_default=True,
              help="Patches are resized to this side before P sees them.")
@click.option("--device", default="auto", show_default=True)
@click.option("--time-limit", type=float, default=None,
              help="Stop after this many seconds (resumable); the file records the iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
def pretrain_teacher(images, out_dir, patch_size, iterations, batch_size, descriptor_dim, width,
                     lambda_k, lambda_m, lambda_c, pretrained_cnn, cnn_weights, cnn_input_size,
                     device, time_limit, seed):
    """Pretrain a teacher T̂ on patches of the natural images in IMAGES (paper §3.1)."""
    from edgestad.data import list_images
    from .teacher import TeacherConfig, pretrain_teacher as run

    config = TeacherConfig(patch_size=int(patch_size), descriptor_dim=descriptor_dim, width=width,
                           iterations=iterations, batch_size=batch_size, lambda_k=lambda_k,
                           lambda_m=lambda_m, lambda_c=lambda_c, pretrained_cnn=pretrained_cnn,
                           cnn_weights=cnn_weights, cnn_input_size=cnn_input_size, seed=seed)
    path = run(list_images(images), out_dir, config, device=_device(device),
               time_limit_s=time_limit)
    from .checkpoint import read_teacher_file
    _, meta = read_teacher_file(path)
    click.echo(f"wrote {path} after {meta['iterations']} iterations; held-out quality: "
               f"{json.dumps(meta['holdout_quality'])}")


# Scales and dense stride of the two documented starting points (width and d come from the
# teachers). "edge" is chosen from the accuracy–cost frontier (README "Performance").
PRESETS = {"paper": {"patch_sizes": (17, 33, 65), "dense_stride": 1},
           "edge": {"patch_sizes": (65,), "dense_stride": 4}}


@click.command("train")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "bundle", type=click.Path(path_type=Path), required=True,
              help="Bundle directory to write (an interrupted run resumes from <out>.partial).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="paper", show_default=True,
              help="paper = p 17 33 65 at dense stride 1 (exact multi-scale); edge = p 65 at "
              "dense stride 4, the README's recommended edge default (1/53 of the paper's GFLOP). "
              "-p and --dense-stride override it.")
@click.option("-p", "--patch-size", "patch_sizes", multiple=True, type=click.Choice(["17", "33", "65"]),
              help="Scales to train (repeat; default: the preset's).")
@click.option("--students", "num_students", type=int, default=3, show_default=True, help="M.")
@click.option("--dense-stride", type=click.Choice(["1", "2", "4", "8"]), default=None,
              help="1 = exact dense map; s>1 = map sampled every s px, upsampled in the graph "
              "(up to s² times cheaper); default: the preset's.")
@click.option("--input-size", type=int, default=256, show_default=True)
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--crop-size", type=int, default=None,
              help="Train on random crops of this side (same expected loss, cheaper steps).")
@click.option("--teacher", "teachers", multiple=True, type=click.Path(dir_okay=False),
              help="A teacher file from pretrain-teacher (repeat per scale); default: shipped.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of good images held out for score statistics and thresholds.")
@click.option("--pixel-fpr", type=float, default=0.001, show_default=True,
              help="Pixel threshold: this false-positive rate on validation good pixels.")
@click.option("--image-fpr", type=float, default=0.0, show_default=True,
              help="Image threshold: this false-positive rate on validation good images.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train(data, bundle, preset, patch_sizes, num_students, dense_stride, input_size, epochs, batch_size,
          lr, crop_size, teachers, val_fraction, pixel_fpr, image_fpr, device, seed):
    """Train students on the good images of DATA (an MVTec category or a plain folder)."""
    from edgestad.models.uninformed_students import StudentTeacherConfig
    from .fit import TrainSettings, train_bundle

    sizes = tuple(sorted(int(p) for p in patch_sizes)) or PRESETS[preset]["patch_sizes"]
    stride = int(dense_stride) if dense_stride else PRESETS[preset]["dense_stride"]
    config = StudentTeacherConfig(patch_sizes=sizes, num_students=num_students,
                                  dense_stride=stride,
                                  input_size=(input_size, input_size))
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, crop_size=crop_size,
                             val_fraction=val_fraction, pixel_fpr=pixel_fpr, image_fpr=image_fpr,
                             seed=seed)
    path = train_bundle(data, bundle, config, settings, teachers, device=_device(device))
    click.echo(f"wrote bundle {path}")
