"""`edgestad synth-defects`: pseudo-defective images, with exact masks, from good images.

For a user who has no defect images yet: the same Perlin-noise generator that trains RSTPM's
discriminator (``edgestad.methods.common.perlin``; DRAEM's recipe) blends an anomaly-source texture
into good images of DATA and writes an MVTec-layout folder::

    OUT/test/synthetic/000.png ...            pseudo-defective images (full resolution)
    OUT/ground_truth/synthetic/000_mask.png   their masks: exactly the pixels that changed
    OUT/test/good/*.png                       copies of a few other good images
    OUT/synthetic.json                        seed, sources, and which good image each one came from

``edgestad evaluate BUNDLE OUT`` then shows what the model flags on them and how the bundle's
thresholds behave. The defects are synthetic: the numbers are a sanity check and a starting point
for thresholds, not a measurement of real-defect accuracy.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

SYNTHETIC = "synthetic"
GOOD_COPIES = 5


class SynthError(ValueError):
    """Bad input to synth-defects; the message names the option or file."""


def write_synthetic_defects(data: str | Path, out: str | Path, n: int, seed: int = 0,
                            anomaly_source: str | Path | None = None, good_copies: int = GOOD_COPIES
                            ) -> dict:
    """Write the folder described in the module docstring; returns the summary written to
    ``synthetic.json``."""
    import cv2
    import numpy as np
    from edgestad.images import DataError, read_image
    from edgestad.datasets import good_images
    from edgestad.methods.common.perlin import PseudoAnomalies, anomaly_source_files

    data, out = Path(data), Path(out)
    if n < 1:
        raise SynthError(f"-n: must be at least 1, got {n}")
    if not data.is_dir():
        raise SynthError(f"DATA: {data}: no such folder")
    try:
        paths = good_images(data)
    except DataError as exc:
        raise SynthError(f"DATA: {exc}") from None
    if anomaly_source is not None and not Path(anomaly_source).is_dir():
        raise SynthError(f"--anomaly-source: {anomaly_source}: no such folder")
    try:
        sources, described = anomaly_source_files(anomaly_source)
    except DataError as exc:
        raise SynthError(f"--anomaly-source: {exc}") from None
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out: {out} exists and is not a folder")
    for sub in (out / "test" / SYNTHETIC, out / "ground_truth" / SYNTHETIC, out / "test" / "good"):
        if sub.is_dir() and any(sub.iterdir()):
            raise SynthError(f"--out: {sub} is not empty; choose another --out or remove it")

    rng = np.random.default_rng(seed)
    order = [paths[i] for i in rng.permutation(len(paths))]
    generator = PseudoAnomalies(sources, seed=seed)
    images_dir = out / "test" / SYNTHETIC
    masks_dir = out / "ground_truth" / SYNTHETIC
    good_dir = out / "test" / "good"
    for d in (images_dir, masks_dir, good_dir):
        d.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n - 1)))
    items = []
    for i in range(n):
        base = order[i % len(order)]
        try:
            image = read_image(base)
        except DataError as exc:
            raise SynthError(f"DATA: {exc}") from None
        defective, mask = generator(image)
        name = f"{i:0{width}d}"
        _write_png(images_dir / f"{name}.png", cv2.cvtColor(defective, cv2.COLOR_RGB2BGR))
        _write_png(masks_dir / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        items.append({"image": f"test/{SYNTHETIC}/{name}.png", "from": str(base),
                      "defect_fraction": round(float(mask.mean()), 5)})
    # good copies: images not used as a base when there are enough, else the first ones
    unused = order[n:] if len(order) > n else order
    copies = []
    for path in unused[:max(1, good_copies)]:
        target = good_dir / path.name
        if target.exists():
            target = good_dir / f"{len(copies):03d}_{path.name}"
        shutil.copyfile(path, target)
        copies.append(str(target.relative_to(out)))
    summary = {"data": str(data.resolve()), "seed": seed, "n": n, "anomaly_source": described,
               "generator": "edgestad.methods.common.perlin.PseudoAnomalies (DRAEM-style Perlin blend)",
               "mask_rule": "exactly the pixels whose value changed",
               "good_copies": copies, "images": items}
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    return summary


def _write_png(path: Path, array) -> None:
    import cv2
    if not cv2.imwrite(str(path), array):
        raise SynthError(f"--out: could not write {path}")


@click.command("synth-defects")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Folder to write (MVTec layout: test/synthetic, ground_truth/synthetic, test/good).")
@click.option("-n", "count", type=int, default=20, show_default=True,
              help="Number of pseudo-defective images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same images and masks.")
@click.option("--anomaly-source", type=click.Path(path_type=Path), default=None,
              help="Folder of texture images blended in as defects (default: the shared "
              "natural-image sample when present, else the good image itself, augmented).")
def synth_defects(data, out, count, seed, anomaly_source):
    """Write pseudo-defective images with exact masks from the good images of DATA (an MVTec
    category's train/good or a plain folder), for `edgestad evaluate BUNDLE OUT`."""
    try:
        summary = write_synthetic_defects(data, out, count, seed, anomaly_source)
    except (SynthError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {summary['n']} pseudo-defective images and masks to {out} "
               f"(sources: {summary['anomaly_source']}); evaluate with: edgestad evaluate BUNDLE {out}")
