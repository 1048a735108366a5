"""The exported graph's I/O contract, in one torch-free place.

Export writes it, the runtime, bench and evaluate read it. Every graph, whatever its method and
precision, has

- input ``images``: uint8, N x 3 x H x W, RGB, values 0..255 (N dynamic, named "batch"; H, W the
  bundle's ``input.height`` / ``input.width``, static). Cast, /255 and mean/std are inside.
- for letterbox bundles (``input.resize == "letterbox"``) a second input ``valid_box``: float32
  N x 4 = (top, left, bottom, right) in model-input pixels (bottom/right exclusive), the part of
  the canvas that holds the image. The padding outside it is excluded from the map and the score.
- outputs ``anomaly_map``: float32 N x 1 x H x W, and ``image_score``: float32 N (the bundle's
  image-score rule, ``outputs.image_score`` in the manifest).
"""
from __future__ import annotations

INPUT_NAME = "images"
VALID_BOX_NAME = "valid_box"
MAP_NAME = "anomaly_map"
SCORE_NAME = "image_score"
OUTPUT_NAMES = (MAP_NAME, SCORE_NAME)
BATCH_DIM = "batch"
PRECISIONS = ("fp32", "fp16", "int8")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
REPORT_FILE = "export_report.json"

# Resize rules a manifest's ``input.resize`` may name.
RESIZE_STRETCH = "area_or_linear"   # squash to H x W (INTER_AREA shrinking, INTER_LINEAR growing)
RESIZE_LETTERBOX = "letterbox"      # keep the aspect ratio, centre, pad with ``input.pad_value``
RESIZE_RULES = (RESIZE_STRETCH, RESIZE_LETTERBOX)


def uses_valid_box(manifest_input: dict) -> bool:
    """Whether graphs of a bundle with this ``input`` section take the ``valid_box`` input."""
    return (manifest_input or {}).get("resize") == RESIZE_LETTERBOX
