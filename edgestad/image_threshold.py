"""The image threshold: what a validation set of n good images can promise (torch-free).

Written once, used by training (``train/calibrate.py``) and by ``edgestad thresholds``
(``trust.py``), from the validation good images' image scores only (defects never seen).

The rule (``rank``): the threshold is the k-th largest validation score, k = ⌊α·(n + 1)⌋ for a
false-reject target α. A new good part from the same process exceeds the k-th largest of n good
scores with probability k / (n + 1) exactly (the scores are exchangeable: a conformal bound), so
that is the rate the bundle promises. The smallest rate n images can support is 1 / (n + 1)
(k = 1, the largest validation score): a lower target cannot be kept by any rule, since nothing
was seen beyond the largest score. Such a target is widened, loudly: the threshold is the
largest validation score and the bundle promises 1 / (n + 1), and says so (``widened``).

The older rule (``normal``: mean + z·std of the validation scores) extrapolates a normal tail
beyond the data; measured on bottle, screw and magnetic_tile it promised 1 % and delivered several
times more (benchmarks/results/decisions). Bundles trained with it keep it for
``edgestad thresholds``.

A review band (optional): a second, lower image threshold at a larger false-reject rate; scores
between the two are REVIEW (a person looks), above the upper one NG.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence


class ImageThresholdError(ValueError):
    """A false-reject target that cannot be used; the message names the option."""


def supported_false_reject(n: int) -> float:
    """The smallest false-reject rate n validation good images can promise: 1 / (n + 1)."""
    return 1.0 / (n + 1)


def rank_threshold(scores: Sequence[float], false_reject: float,
                   option: str = "--image-false-reject", min_k: int = 1) -> dict:
    """{"threshold", "promised", "k", "n", "widened", "rule"} for target ``false_reject`` (0 = the
    largest validation score); ``min_k``: at least the k-th largest (a review band lies below the
    NG threshold's rank)."""
    if not 0 <= false_reject < 0.5:
        raise ImageThresholdError(f"{option}: must be in [0, 0.5), got {false_reject}")
    ordered = sorted((float(s) for s in scores), reverse=True)
    n = len(ordered)
    if n == 0:
        raise ImageThresholdError(f"{option}: no validation image scores to set it from")
    if min_k > n:
        raise ImageThresholdError(f"{option}: {n} validation images leave no rank below the "
                                  f"{_ordinal(min_k - 1)} largest score for it")
    k = int(math.floor(false_reject * (n + 1) + 1e-9))
    widened = 0 < false_reject and k < min_k
    k = max(min_k, k)
    promised = k / (n + 1)
    rule = (f"the {_ordinal(k)} largest of {n} validation good image scores: "
            f"promises {promised:.3g} of good parts NG (k/(n+1))")
    if widened:
        rule += (f"; the target {false_reject:g} is below what {n} validation images support "
                 f"({min_k / (n + 1):.3g}), so it was widened")
    return {"threshold": ordered[k - 1], "promised": promised, "k": k, "n": n,
            "widened": widened, "rule": rule}


def normal_threshold(mean: float, std: float, false_reject: float) -> tuple[float, str]:
    """The older rule: mean + z·std of the validation scores (``false_reject`` > 0)."""
    z = NormalDist().inv_cdf(1.0 - false_reject)
    return mean + z * std, (f"normal fit to validation good image scores: mean + {z:.3f}·std "
                            f"(false-reject target {false_reject:g})")


def widened_warning(result: dict, option: str = "--image-false-reject") -> str | None:
    """The one line a user must read when a target was widened (None otherwise)."""
    if not result["widened"]:
        return None
    return (f"warning: {option}: {result['n']} validation good images cannot support a "
            f"false-reject rate below {result['promised']:.3g}; the threshold is the "
            f"{_ordinal(result['k'])} largest validation score and promises "
            f"{result['promised']:.3g}. More good images (or a larger --val-fraction) lower it.")


def _ordinal(k: int) -> str:
    if k == 1:
        return "1st"
    suffix = {2: "nd", 3: "rd"}.get(k % 10 if k % 100 not in (11, 12, 13) else 0, "th")
    return f"{k}{suffix}"


def recall_threshold(defect_scores: Sequence[float], recall: float, validation_scores:
                     Sequence[float] | None = None) -> dict:
    """The highest image threshold that still makes ``recall`` of these real defective parts NG,
    and what it costs on the good parts: the share of the stored validation good scores above it
    (``validation_good_ng``) and the conformal estimate for a new good part, (count + 1) / (n + 1)
    (``expected_good_ng``)."""
    import numpy as np
    if not 0 < recall <= 1:
        raise ImageThresholdError(f"--recall: must be in (0, 1], got {recall}")
    ordered = sorted((float(s) for s in defect_scores), reverse=True)
    m = len(ordered)
    if m == 0:
        raise ImageThresholdError("--defects: no defective images to set the threshold from")
    k = int(math.ceil(recall * m - 1e-9))
    threshold = float(np.nextafter(np.float32(ordered[k - 1]), np.float32(-np.inf)))
    out = {"threshold": threshold, "defects": m, "caught": k, "recall": k / m,
           "rule": f"just below the {_ordinal(k)} highest score of {m} real defective images "
                   f"(recall target {recall:g}: {k}/{m} NG)"}
    if validation_scores:
        n = len(validation_scores)
        above = sum(1 for s in validation_scores if s > threshold)
        out.update(validation_good_ng=above / n, expected_good_ng=(above + 1) / (n + 1))
        out["rule"] += (f"; {above}/{n} validation good images above it, expected good parts NG "
                        f"about {(above + 1) / (n + 1):.3g}")
    return out
