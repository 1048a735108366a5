"""The decision thresholds: every rule, written once, torch-free.

Used by training (``train/fit.py`` fits them on the validation good images: :func:`fit_thresholds`)
and by ``edgestad thresholds`` and the operator page (``edgestad/bundle_thresholds.py`` moves them
later, from what training stored: :func:`new_thresholds`), so both apply the same rule.

pixel: the (1 − pixel_fpr) quantile of all valid validation pixels, a pixel false-positive rate of
``pixel_fpr`` on good parts. The quantiles at a grid of rates (``PIXEL_FPR_GRID``) are stored so
that ``--pixel-fpr`` can move the threshold without retraining (exact at the grid, log-linear
between).

image (``rank``): the threshold is the k-th largest validation score, k = ⌊α·(n + 1)⌋ for a
false-reject target α. A new good part from the same process exceeds the k-th largest of n good
scores with probability k / (n + 1) exactly (the scores are exchangeable: a conformal bound), so
that is the rate the bundle promises. The smallest rate n images can support is 1 / (n + 1)
(k = 1, the largest validation score): a lower target cannot be kept by any rule, since nothing
was seen beyond the largest score. Such a target is widened, loudly: the threshold is the
largest validation score and the bundle promises 1 / (n + 1), and says so (``widened``).

k / (n + 1) is an average over the draw of the validation images; one bundle's own rate varies
around it: the share of new good parts above the k-th largest of n validation scores is
Beta(k, n + 1 − k) distributed, wide when k is small (k = 1, n = 32: 3.0 % on average, but above
6.1 % for one bundle in seven). So every promise comes with the rate this bundle stays below
with 90 % confidence (:func:`promise_bound`), and ``evaluate`` reports the delivered rate with
its own interval (:func:`rate_interval`): a test set of 41 good parts cannot tell 3 % from 8 %.

The older rule (``normal``: mean + z·std of the validation scores) extrapolates a normal tail
beyond the data; measured on bottle, screw and magnetic_tile it promised 1 % and delivered several
times more (studies/results/decisions). Bundles trained with it keep it for
``edgestad thresholds``.

A review band (optional): a second, lower image threshold at a larger false-reject rate; scores
between the two are REVIEW (a person looks), above the upper one NG.
"""
from __future__ import annotations

import json
import math
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np


class ThresholdError(ValueError):
    """A threshold target that cannot be used; the message names the option."""


def supported_false_reject(n: int) -> float:
    """The smallest false-reject rate n validation good images can promise: 1 / (n + 1)."""
    return 1.0 / (n + 1)


PROMISE_CONFIDENCE = 0.9


def promise_bound(k: int, n: int, confidence: float = PROMISE_CONFIDENCE) -> float:
    """The false-reject rate a bundle thresholded at the k-th largest of n validation good scores
    stays below with probability ``confidence`` (over the draw of its validation images): the
    ``confidence`` quantile of Beta(k, n + 1 − k), whose mean k / (n + 1) is the promise."""
    from scipy.stats import beta
    return float(beta.ppf(confidence, k, n + 1 - k))


def rate_interval(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a rate seen as ``count`` of ``n``: what a delivered
    good-NG count on a test set says about the rate itself."""
    from scipy.stats import binomtest
    ci = binomtest(int(count), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def describe_promise(promised: float, bound: float | None) -> str:
    """'3.03 % on average, below 6.94 % with 90 % confidence'."""
    text = f"{100 * promised:.3g} % on average"
    if bound is not None:
        text += f", below {100 * bound:.3g} % with {100 * PROMISE_CONFIDENCE:.0f} % confidence"
    return text


def rank_threshold(scores: Sequence[float], false_reject: float,
                   option: str = "--image-false-reject", min_k: int = 1) -> dict:
    """{"threshold", "promised", "bound", "k", "n", "widened", "rule"} for target ``false_reject`` (0 = the
    largest validation score); ``min_k``: at least the k-th largest (a review band lies below the
    NG threshold's rank)."""
    if not 0 <= false_reject < 0.5:
        raise ThresholdError(f"{option}: must be in [0, 0.5), got {false_reject}")
    ordered = sorted((float(s) for s in scores), reverse=True)
    n = len(ordered)
    if n == 0:
        raise ThresholdError(f"{option}: no validation image scores to set it from")
    if min_k > n:
        raise ThresholdError(f"{option}: {n} validation images leave no rank below the "
                                  f"{_ordinal(min_k - 1)} largest score for it")
    k = int(math.floor(false_reject * (n + 1) + 1e-9))
    widened = 0 < false_reject and k < min_k
    k = max(min_k, k)
    promised, bound = k / (n + 1), promise_bound(k, n)
    rule = (f"the {_ordinal(k)} largest of {n} validation good image scores: "
            f"promises good parts NG {describe_promise(promised, bound)} (k/(n+1); Beta(k, n+1-k))")
    if widened:
        rule += (f"; the target {false_reject:g} is below what {n} validation images support "
                 f"({min_k / (n + 1):.3g}), so it was widened")
    return {"threshold": ordered[k - 1], "promised": promised, "bound": bound, "k": k, "n": n,
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
    if not 0 < recall <= 1:
        raise ThresholdError(f"--recall: must be in (0, 1], got {recall}")
    ordered = sorted((float(s) for s in defect_scores), reverse=True)
    m = len(ordered)
    if m == 0:
        raise ThresholdError("--defects: no defective images to set the threshold from")
    k = int(math.ceil(recall * m - 1e-9))
    threshold = float(np.nextafter(np.float32(ordered[k - 1]), np.float32(-np.inf)))
    out = {"threshold": threshold, "defects": m, "caught": k, "recall": k / m,
           "rule": f"just below the {_ordinal(k)} highest score of {m} real defective images "
                   f"(recall target {recall:g}: {k}/{m} NG)"}
    if validation_scores:
        n = len(validation_scores)
        above = sum(1 for s in validation_scores if s > threshold)
        expected, bound = (above + 1) / (n + 1), promise_bound(above + 1, n)
        out.update(validation_good_ng=above / n, expected_good_ng=expected,
                   expected_good_ng_bound=bound)
        out["rule"] += (f"; {above}/{n} validation good images above it: expected good parts "
                        f"NG {describe_promise(expected, bound)}")
    return out


def valid_pixels(maps: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    if boxes is None:
        return maps.reshape(-1)
    parts = []
    for amap, box in zip(maps, boxes):
        top, left, bottom, right = (int(round(float(v))) for v in box)
        parts.append(amap[top:bottom, left:right].reshape(-1))
    return np.concatenate(parts)


# Pixel false-positive rates (1, 2, 3, 5 per decade, 1e-5 .. 0.5) at which the validation pixel
# quantiles are stored, so that `edgestad thresholds --pixel-fpr` can recompute the pixel
# threshold without retraining (exact at these and the trained rate, log-linear between).
PIXEL_FPR_GRID = tuple(float(f"{m}e{e}") for e in range(-5, 0) for m in (1, 2, 3, 5))


def fit_thresholds(val_maps: np.ndarray, val_scores: np.ndarray, pixel_fpr: float = 0.001,
                   image_false_reject: float = 0.05, boxes: np.ndarray | None = None,
                   review_false_reject: float | None = None) -> dict:
    pixels = valid_pixels(val_maps, boxes)
    pixel = float(np.quantile(pixels, 1.0 - pixel_fpr))
    fprs = sorted(set(PIXEL_FPR_GRID) | {float(pixel_fpr)})
    quantiles = {"fpr": fprs, "value": [float(np.quantile(pixels, 1.0 - f)) for f in fprs],
                 "pixels": int(pixels.size)}
    scores = np.asarray(val_scores, dtype=np.float64)
    mu, sigma = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    image = rank_threshold(scores, image_false_reject)
    out = {"pixel": pixel, "image": float(image["threshold"]),
           "rule": {"pixel": f"quantile {1 - pixel_fpr:g} of validation good pixels",
                    "pixel_fpr": pixel_fpr, "image": image["rule"],
                    "image_false_reject": image_false_reject,
                    "image_promised_false_reject": image["promised"],
                    "image_promise_bound": image["bound"],
                    "image_promise_confidence": PROMISE_CONFIDENCE,
                    "image_target_widened": image["widened"],
                    "validation_score_mean": mu, "validation_score_std": sigma,
                    "validation_score_max": float(scores.max()),
                    "validation_scores": sorted(float(v) for v in scores),
                    "validation_images": int(len(scores)),
                    "validation_pixel_quantiles": quantiles}}
    out["warnings"] = [w for w in [widened_warning(image)] if w]
    if review_false_reject is not None:
        # the band starts at least one rank below the NG threshold
        review = rank_threshold(scores, review_false_reject, "--review-false-reject",
                                min_k=image["k"] + 1)
        out["image_review"] = float(review["threshold"])
        out["rule"].update(image_review=review["rule"], review_false_reject=review_false_reject,
                           review_promised_false_reject=review["promised"])
        out["warnings"] += [w for w in [widened_warning(review, "--review-false-reject")] if w]
    return out


# ------------------------------------------------------------------------------ moving them later


def pixel_threshold_for_fpr(thresholds: Mapping, fpr: float) -> tuple[float, str]:
    """The pixel threshold at validation pixel false-positive rate ``fpr``, from the quantile
    table ``fit_thresholds`` stores (exact at its points, log-linear between them)."""
    if not 0 < fpr < 1:
        raise ThresholdError(f"--pixel-fpr: must be between 0 and 1, got {fpr}")
    table = (thresholds.get("rule") or {}).get("validation_pixel_quantiles")
    if not isinstance(table, Mapping) or not table.get("fpr"):
        raise ThresholdError("--pixel-fpr: this bundle stores no validation pixel quantiles (trained "
                             "before edgestad recorded them); set --pixel-threshold, or retrain")
    fprs, values = [float(v) for v in table["fpr"]], [float(v) for v in table["value"]]
    for f, v in zip(fprs, values):
        if math.isclose(f, fpr, rel_tol=1e-12, abs_tol=0.0):
            return v, f"quantile {1 - fpr:g} of validation good pixels (stored)"
    if not fprs[0] <= fpr <= fprs[-1]:
        raise ThresholdError(f"--pixel-fpr: {fpr:g} is outside the stored validation quantiles "
                             f"({fprs[0]:g} .. {fprs[-1]:g}, {table.get('pixels', '?')} validation pixels)")
    for (f0, v0), (f1, v1) in zip(zip(fprs, values), zip(fprs[1:], values[1:])):
        if f0 <= fpr <= f1:
            t = (math.log(fpr) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + t * (v1 - v0), (f"quantile {1 - fpr:g} of validation good pixels "
                                        f"(interpolated between the stored fpr {f0:g} and {f1:g})")
    raise ThresholdError(f"--pixel-fpr: {fpr:g} not found in the stored quantiles")  # pragma: no cover


def image_threshold_for_false_reject(thresholds: Mapping, false_reject: float,
                                     option: str = "--image-false-reject",
                                     min_k: int = 1) -> tuple[float, str, dict | None]:
    """(threshold, rule, rank result) for a false-reject target, from the validation image scores
    stored at training time, by the same rule as training (:func:`rank_threshold`). Bundles
    trained before the scores were stored use their stored mean/std (the normal fit they were
    made with; rank result None)."""
    if not 0 <= false_reject < 0.5:
        raise ThresholdError(f"{option}: must be in [0, 0.5), got {false_reject}")
    rule = thresholds.get("rule") or {}
    scores = rule.get("validation_scores")
    if isinstance(scores, list) and scores:
        result = rank_threshold(scores, false_reject, option, min_k=min_k)
        return float(result["threshold"]), result["rule"], result
    try:
        if false_reject == 0:
            return float(rule["validation_score_max"]), "largest validation good image score", None
        mu, sigma = float(rule["validation_score_mean"]), float(rule["validation_score_std"])
    except (KeyError, TypeError, ValueError):
        raise ThresholdError(f"{option}: this bundle stores no validation image-score "
                             "statistics; set --image-threshold, or retrain") from None
    threshold, text = normal_threshold(mu, sigma, false_reject)
    return threshold, text, None


def _set_by_hand(new: dict, rules: list, key: str, value: float, option: str, **cleared) -> None:
    """A threshold set to a value by hand: checked, recorded in the rule, the rule's derived
    fields (``cleared``) reset."""
    if not math.isfinite(value):
        raise ThresholdError(f"{option}: must be a finite number, got {value}")
    new[key] = float(value)
    new["rule"].update({key: f"set by hand (edgestad thresholds {option})", **cleared})
    rules.append(f"{option} {value:g}: set by hand")


def new_thresholds(thresholds: Mapping, *, pixel_fpr: float | None = None,
                   image_false_reject: float | None = None, pixel: float | None = None,
                   image: float | None = None, review_false_reject: float | None = None,
                   review: float | None = None, no_review: bool = False,
                   defects: list[float] | None = None, recall: float | None = None
                   ) -> tuple[dict, list[str]]:
    """(the new thresholds dict, the rule of each change). ``review*``: the REVIEW band's lower
    threshold (``no_review`` removes the band)."""
    new = json.loads(json.dumps(dict(thresholds)))
    rule = new.setdefault("rule", {})
    rules = []
    if pixel_fpr is not None:
        new["pixel"], text = pixel_threshold_for_fpr(thresholds, pixel_fpr)
        rule.update(pixel=text, pixel_fpr=pixel_fpr)
        rules.append(f"--pixel-fpr {pixel_fpr:g}: {text}")
    if pixel is not None:
        _set_by_hand(new, rules, "pixel", pixel, "--pixel-threshold", pixel_fpr=None)
    image_rank = None
    if image_false_reject is not None:
        new["image"], text, image_rank = image_threshold_for_false_reject(thresholds, image_false_reject)
        rule.update(image=text, image_false_reject=image_false_reject,
                    image_promised_false_reject=image_rank["promised"] if image_rank else None,
                    image_promise_bound=image_rank["bound"] if image_rank else None,
                    image_target_widened=bool(image_rank and image_rank["widened"]))
        rules.append(f"--image-false-reject {image_false_reject:g}: {text}")
    if image is not None:
        _set_by_hand(new, rules, "image", image, "--image-threshold", image_false_reject=None,
                     image_promised_false_reject=None, image_promise_bound=None,
                     image_target_widened=False)
    if defects is not None:
        found = recall_threshold(defects, recall, rule.get("validation_scores"))
        new["image"] = found["threshold"]
        rule.update(image=found["rule"], image_false_reject=None,
                    image_promised_false_reject=found.get("expected_good_ng"),
                    image_promise_bound=found.get("expected_good_ng_bound"),
                    image_target_widened=False, defects={
                        k: found[k] for k in ("defects", "caught", "recall", "validation_good_ng",
                                              "expected_good_ng", "expected_good_ng_bound")
                        if k in found})
        rules.append(f"--defects ({len(defects)} images) --recall {recall:g}: {found['rule']}")
    if review_false_reject is not None:
        min_k = image_rank["k"] + 1 if image_rank else 1
        new["image_review"], text, _ = image_threshold_for_false_reject(
            thresholds, review_false_reject, "--review-false-reject", min_k=min_k)
        rule.update(image_review=text, review_false_reject=review_false_reject)
        rules.append(f"--review-false-reject {review_false_reject:g}: {text}")
    if review is not None:
        _set_by_hand(new, rules, "image_review", review, "--review-threshold",
                     review_false_reject=None)
    if no_review and new.get("image_review") is not None:
        # None, not a deleted key: manifest updates merge, so a key is ended by null
        new["image_review"] = None
        for key in ("image_review", "review_false_reject", "review_promised_false_reject"):
            if key in rule:
                rule[key] = None
        rules.append("--no-review: REVIEW band removed")
    if new.get("image_review") is not None and not new["image_review"] < new["image"]:
        raise ThresholdError(f"--review-threshold: the REVIEW threshold {new['image_review']:g} "
                             f"must be below the image (NG) threshold {new['image']:g}")
    return new, rules
