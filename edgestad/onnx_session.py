"""The one place that opens ONNX Runtime sessions and runs them on image batches (torch-free).

Used by export (parity, accuracy), evaluate (``--backend onnx``), bench and the runtime backend,
so every graph is run with the same options and fed the same inputs.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .contract import INPUT_NAME, MAP_NAME, SCORE_NAME, VALID_BOX_NAME


def ort_session(model, threads: int | None = None, providers: Sequence | None = None):
    """An ONNX Runtime session for a graph (bytes or path); all graph optimisations on, as deployed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    model = str(model) if isinstance(model, os.PathLike) else model
    return ort.InferenceSession(model, sess_options=options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def takes_valid_box(session) -> bool:
    return any(i.name == VALID_BOX_NAME for i in session.get_inputs())


def feeds(session, images: np.ndarray, boxes: np.ndarray | None = None) -> dict:
    """The input dict for a uint8 N x 3 x H x W batch (and its valid boxes, letterbox graphs)."""
    feed = {INPUT_NAME: np.ascontiguousarray(images)}
    if takes_valid_box(session):
        if boxes is None:
            h, w = images.shape[-2:]
            boxes = np.tile(np.array([0, 0, h, w], np.float32), (len(images), 1))
        feed[VALID_BOX_NAME] = np.ascontiguousarray(boxes, dtype=np.float32)
    return feed


def run_session(session, images: np.ndarray, batch_size: int = 4,
                boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x H x W -> (maps float32 N x H x W, scores float32 N)."""
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        part = None if boxes is None else boxes[start:start + batch_size]
        out_map, out_score = session.run([MAP_NAME, SCORE_NAME],
                                         feeds(session, images[start:start + batch_size], part))
        maps.append(out_map.reshape(out_map.shape[0], *out_map.shape[-2:]))
        scores.append(out_score.reshape(-1))
    return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)
