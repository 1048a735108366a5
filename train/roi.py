"""`edgestad roi DATA`: propose a region of interest from the good training images.

Where the part is, good images differ from each other (its position, texture and lighting vary a
little from part to part); where the static background or fixture is, they hardly do. The proposal
is the bounding box of the pixels whose spread over the training images (per-pixel standard
deviation of the grey levels, on a working copy of at most 256 px) is above Otsu's threshold of
that spread, grown by a margin. The user confirms it by looking at the preview (the box drawn on
the median image) and passes it to `edgestad train --roi x,y,w,h`; nothing is applied without them.
Images must share one size (a region in pixels means nothing otherwise).
"""
from __future__ import annotations

from pathlib import Path

import click
import cv2
import numpy as np

WORK_SIDE = 256


def propose_roi(paths, margin: float = 0.05, limit: int = 200) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """((x, y, w, h) in source pixels, the median image as BGR uint8 for a preview)."""
    from edgestad.images import DataError, image_size, read_image
    paths = list(paths)[:limit]
    if len(paths) < 2:
        raise DataError("DATA: need at least two good images to propose a region of interest")
    sizes = {image_size(p) for p in paths}
    if len(sizes) > 1:
        raise DataError(f"DATA: the images have {len(sizes)} different sizes; a region of interest "
                        f"in pixels needs one size")
    h, w = sizes.pop()
    scale = min(1.0, WORK_SIDE / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    stack = np.stack([cv2.resize(cv2.cvtColor(read_image(p), cv2.COLOR_RGB2GRAY), (sw, sh),
                                 interpolation=cv2.INTER_AREA) for p in paths]).astype(np.float32)
    spread = cv2.GaussianBlur(stack.std(axis=0), (0, 0), 2.0)
    scaled = cv2.normalize(spread, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, moving = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ys, xs = np.nonzero(moving)
    if len(xs) == 0:
        x0, y0, x1, y1 = 0, 0, sw, sh
    else:
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = margin * sw, margin * sh
    x0, y0 = max(0, int(np.floor((x0 - mx) / scale))), max(0, int(np.floor((y0 - my) / scale)))
    x1, y1 = min(w, int(np.ceil((x1 + mx) / scale))), min(h, int(np.ceil((y1 + my) / scale)))
    median = np.median(np.stack([read_image(p) for p in paths[:25]]), axis=0).astype(np.uint8)
    return (x0, y0, x1 - x0, y1 - y0), cv2.cvtColor(median, cv2.COLOR_RGB2BGR)


@click.command("roi")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the proposed box on the median training image here (PNG) to confirm.")
@click.option("--margin", type=float, default=0.05, show_default=True,
              help="Grow the box by this share of the image on every side.")
def roi_command(data, preview, margin):
    """Propose a region of interest from the good images of DATA (to confirm, then pass to
    `edgestad train --roi`)."""
    from edgestad.images import DataError
    from edgestad.datasets import good_images
    if not 0 <= margin < 0.5:
        raise click.UsageError(f"--margin: must be in [0, 0.5), got {margin}")
    try:
        (x, y, w, h), median = propose_roi(good_images(data), margin)
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    full_h, full_w = median.shape[:2]
    click.echo(f"proposed region of interest: --roi {x},{y},{w},{h} "
               f"({w * h / (full_w * full_h):.0%} of the {full_w}x{full_h} image)")
    if preview is not None:
        out = median.copy()
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (0, 0, 255), max(1, full_w // 200))
        preview.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(preview), out):
            raise click.UsageError(f"--preview: cannot write {preview}")
        click.echo(f"preview written to {preview}: check that the box holds the whole part")
