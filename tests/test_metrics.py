"""edgestad.metrics against hand-computed PRO curves / AUCs and a brute-force reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from edgestad.metrics import au_pro, image_auroc, pixel_auroc, pro_curve, trapezoid


def _worked_example() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two 3x3 images; A has two separate regions, B has an empty mask.

    Mask A          Map A             Mask B (empty)   Map B
    1 1 0           .9 .5 .1          0 0 0            .8 .5 .1
    0 0 0           .1 .1 .1          0 0 0            .1 .1 .1
    0 0 1           .1 .1 .7          0 0 0            .1 .1 .1

    Regions: R1 = {(0,0), (0,1)} (size 2), R2 = {(2,2)} (size 1) -> 2 regions.
    OK pixels: 6 in A + 9 in B = 15.
    """
    mask_a = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=np.uint8) * 255  # {0, 255} mask
    map_a = np.array([[0.9, 0.5, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.7]])
    mask_b = np.zeros((3, 3), dtype=bool)
    map_b = np.array([[0.8, 0.5, 0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    return [map_a, map_b], [mask_a, mask_b]


def _brute_force_pro_curve(maps, masks):
    """Threshold-by-threshold definition: for each distinct score t (descending), predict score >= t."""
    labelled = [ndimage.label(m != 0, structure=np.ones((3, 3)))[0] for m in masks]
    n_ok = sum(int((lab == 0).sum()) for lab in labelled)
    regions = [(i, lab == k) for i, lab in enumerate(labelled) for k in range(1, lab.max() + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fp = sum(int(((lab == 0) & (amap >= t)).sum()) for lab, amap in zip(labelled, maps))
        fprs.append(fp / n_ok)
        pros.append(np.mean([(maps[i][r] >= t).mean() for i, r in regions]))
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


# ---------------------------------------------------------------- PRO curve / AU-PRO


def test_worked_example_curve_points():
    # Descending distinct thresholds (FPR over 15 OK pixels, PRO averaged over 2 regions):
    #   t=0.9: R1 half covered               -> FPR 0,     PRO (1/2 + 0)/2 = 0.25
    #   t=0.8: one OK pixel of B             -> FPR 1/15,  PRO 0.25
    #   t=0.7: R2 covered                    -> FPR 1/15,  PRO (1/2 + 1)/2 = 0.75
    #   t=0.5: tie: R1's 2nd pixel AND an OK pixel of B cross together, ONE step
    #                                        -> FPR 2/15,  PRO 1.0
    #   t=0.1: the remaining 13 OK pixels    -> FPR 1,     PRO 1.0
    # plus (0, 0) in front and (1, 1) at the end (MVTec convention).
    fprs, pros = pro_curve(*_worked_example())
    np.testing.assert_allclose(fprs, [0, 0, 1 / 15, 1 / 15, 2 / 15, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 0.25, 0.75, 1.0, 1, 1])


def test_worked_example_au_pro():
    # Area up to FPR 0.3 of the curve above:
    #   (0,.25)->(1/15,.25):        0.25 * 1/15               = 1/60
    #   (1/15,.75)->(2/15,1):       (0.75 + 1)/2 * 1/15       = 7/120
    #   (2/15,1)->(0.3,1) [interp]: 1 * (0.3 - 2/15)          = 1/6
    #   total 29/120; divided by 0.3 -> 29/36
    assert au_pro(*_worked_example()) == pytest.approx(29 / 36)


def test_integration_limit_between_two_sample_points():
    # Limit 0.1 lies between the samples (1/15, 0.75) and (2/15, 1.0):
    #   y(0.1) = 0.75 + 0.25 * (0.1 - 1/15) / (1/15) = 0.875
    #   area = 1/60 + (0.75 + 0.875)/2 * (0.1 - 1/15) = 0.5/30 + 0.8125/30 = 0.04375
    #   au_pro = 0.04375 / 0.1 = 0.4375
    assert au_pro(*_worked_example(), integration_limit=0.1) == pytest.approx(0.4375)
    # Limit exactly at a sample point (FPR 2/15): no correction term needed.
    #   area = 1/60 + 7/120 = 9/120, divided by 2/15 -> 0.5625
    assert au_pro(*_worked_example(), integration_limit=2 / 15) == pytest.approx(0.5625)


def test_ties_form_a_single_step():
    # All four pixels share one score: the only threshold jumps from (0,0) straight to (1,1);
    # no intermediate point depends on the (arbitrary) order of tied pixels.
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    fprs, pros = pro_curve([np.full((2, 2), 0.5)], [mask])
    np.testing.assert_array_equal(fprs, [0, 1, 1])
    np.testing.assert_array_equal(pros, [0, 1, 1])


def test_diagonal_pixels_are_one_region():
    # (0,0)-(0,1) are 4-connected, (1,2) touches (0,1) only diagonally.
    # 8-connectivity: ONE region of 3 pixels; at t=1.0 only (1,2) is covered -> PRO 1/3.
    # (4-connectivity would give regions of size 2 and 1 -> PRO (0 + 1)/2 = 0.5.)
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.uint8)
    amap = np.array([[0.0, 0.0, 0.5], [0.5, 0.5, 1.0], [0.5, 0.5, 0.5]])
    fprs, pros = pro_curve([amap], [mask])
    # t=1.0 -> (0, 1/3); t=0.5 -> all 5 OK pixels (1, 1/3); t=0.0 -> (1, 1); then (1, 1)
    np.testing.assert_allclose(fprs, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(pros, [0, 1 / 3, 1 / 3, 1, 1])


def test_empty_mask_image_only_adds_ok_pixels():
    # Image 0 has one region detected perfectly. Adding an empty-mask image whose pixels all
    # score 0.9 (above the defect's 0.8) puts 4 false positives before the region is found.
    mask0 = np.array([[1, 0], [0, 0]], dtype=bool)
    map0 = np.array([[0.8, 0.0], [0.0, 0.0]])
    fprs, pros = pro_curve([map0], [mask0])
    np.testing.assert_allclose(fprs, [0, 0, 1, 1])
    np.testing.assert_allclose(pros, [0, 1, 1, 1])

    # 3 OK pixels in image 0 + 4 in image 1 = 7; still one region.
    #   t=0.9 -> (4/7, 0); t=0.8 -> (4/7, 1); t=0.0 -> (1, 1)
    fprs, pros = pro_curve([map0, np.full((2, 2), 0.9)], [mask0, np.zeros((2, 2), np.uint8)])
    np.testing.assert_allclose(fprs, [0, 4 / 7, 4 / 7, 1, 1])
    np.testing.assert_allclose(pros, [0, 0, 1, 1, 1])
    # FPR 0.3 < 4/7: PRO is interpolated on the ramp (0,0)->(4/7,0), so the area is 0.
    assert au_pro([map0, np.full((2, 2), 0.9)], [mask0, np.zeros((2, 2), bool)]) == 0.0


def test_perfect_detector_scores_one():
    rng = np.random.default_rng(0)
    masks = [rng.random((32, 32)) > 0.9 for _ in range(5)]
    maps = [m.astype(np.float32) for m in masks]
    assert au_pro(maps, masks) == pytest.approx(1.0)
    assert au_pro(maps, masks, integration_limit=1.0) == pytest.approx(1.0)
    assert pixel_auroc(maps, masks) == 1.0


def test_constant_map_scores_half_the_limit():
    # One threshold: the curve is the diagonal (0,0)->(1,1); area up to L is L^2/2, /L -> L/2.
    masks = [np.eye(8, dtype=bool), np.zeros((8, 8), dtype=bool)]
    maps = [np.full((8, 8), 3.0), np.full((8, 8), 3.0)]
    assert au_pro(maps, masks) == pytest.approx(0.15)
    assert au_pro(maps, masks, integration_limit=1.0) == pytest.approx(0.5)
    assert pixel_auroc(maps, masks) == 0.5


def test_matches_brute_force_definition_with_many_ties():
    rng = np.random.default_rng(1)
    masks, maps = [], []
    for i in range(6):
        mask = ndimage.binary_dilation(rng.random((12, 12)) > 0.93, iterations=i % 2)
        if i == 2:
            mask[:] = False  # an empty mask among them
        masks.append(mask)
        # Integer-valued scores force many ties, partly correlated with the mask.
        maps.append(rng.integers(0, 6, (12, 12)) + 3 * mask)
    fprs, pros = pro_curve(maps, masks)
    ref_fprs, ref_pros = _brute_force_pro_curve(maps, masks)
    np.testing.assert_allclose(fprs, ref_fprs, atol=1e-12)
    np.testing.assert_allclose(pros, ref_pros, atol=1e-12)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_mask_encodings_are_equivalent():
    maps, masks = _worked_example()
    as_bool = [m != 0 for m in masks]
    as_01 = [(m != 0).astype(np.float32) for m in masks]
    as_255 = [(m != 0).astype(np.uint8) * 255 for m in masks]
    expected = au_pro(maps, as_bool)
    assert au_pro(maps, as_01) == expected
    assert au_pro(maps, as_255) == expected


def test_hundred_256px_maps_are_fast():
    rng = np.random.default_rng(2)
    masks = [np.zeros((256, 256), dtype=bool) for _ in range(100)]
    for i, m in enumerate(masks[::2]):
        m[10 + i : 40 + i, 20:60] = True
    maps = [rng.random((256, 256), dtype=np.float32) + m for m in masks]
    # CPU time, not wall time: the test machine may be shared. The target is < 2 s (about 1.3 s
    # measured on a 2-vCPU EPYC); the bound is loose so only a non-vectorised regression (a
    # Python loop over thresholds would take hours) fails, not a busy machine.
    start = time.process_time()
    value = au_pro(maps, masks)
    elapsed = time.process_time() - start
    assert value == pytest.approx(1.0)  # every defect pixel outscores every OK pixel
    assert elapsed < 5.0, f"au_pro on 100 maps of 256x256 took {elapsed:.2f} s of CPU time"


# ---------------------------------------------------------------- trapezoid


def test_trapezoid_full_and_limited():
    x, y = [0.0, 1.0, 2.0], [0.0, 1.0, 1.0]
    assert trapezoid(x, y) == pytest.approx(1.5)
    assert trapezoid(x, y, x_max=1.0) == pytest.approx(0.5)  # sample point: no correction
    # 0.5 up to x=1, then correction from 1 to 1.5 with y(1.5) = 1 interpolated: 1 * 0.5
    assert trapezoid(x, y, x_max=1.5) == pytest.approx(1.0)
    # between (0,0) and (1,1): y(0.5)=0.5, correction 0.5*(0.5+0)*0.5 = 0.125
    assert trapezoid(x, y, x_max=0.5) == pytest.approx(0.125)


def test_trapezoid_vertical_step_uses_last_y():
    # Repeated x = a vertical step; the correction starts from the LAST point at x=1 (y=1).
    assert trapezoid([0, 1, 1, 2], [0, 0, 1, 1], x_max=1.5) == pytest.approx(0.5)


def test_trapezoid_drops_non_finite_points_with_warning():
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert trapezoid([0, 1, np.nan, 2], [0, 1, 5, 1]) == pytest.approx(1.5)


def test_trapezoid_limit_outside_range():
    with pytest.raises(ValueError, match="outside the sampled range"):
        trapezoid([0.0, 1.0], [0.0, 1.0], x_max=2.0)


# ---------------------------------------------------------------- AUROC


def test_image_auroc_hand_cases():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0


def test_image_auroc_ties_count_half():
    assert image_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # pairs (pos, neg): (0.5, 0.5) tie -> 1/2, (1.0, 0.5) -> 1; total 1.5 / 2
    assert image_auroc([0.5, 0.5, 1.0], [0, 1, 1]) == pytest.approx(0.75)


def test_pixel_auroc_worked_example():
    # Positives 0.9, 0.7, 0.5 vs 15 negatives (0.8, 0.5 and thirteen 0.1):
    #   0.9 beats 15; 0.7 beats 14; 0.5 beats 13 and ties 1 -> 13.5
    #   (15 + 14 + 13.5) / (3 * 15) = 42.5 / 45 = 17/18
    assert pixel_auroc(*_worked_example()) == pytest.approx(17 / 18)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both normal and anomalous.*all 3 are normal"):
        image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="all 4 are anomalous"):
        pixel_auroc([np.zeros((2, 2))], [np.ones((2, 2), dtype=bool)])


def test_image_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="label 1 is 2"):
        image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        image_auroc([0.1, np.nan], [0, 1])


# ---------------------------------------------------------------- input validation


def test_mismatched_lengths():
    maps, masks = _worked_example()
    with pytest.raises(ValueError, match="got 2 anomaly maps but 1 ground-truth masks"):
        au_pro(maps, masks[:1])
    with pytest.raises(ValueError, match="no anomaly maps"):
        pro_curve([], [])


def test_mismatched_shapes_name_the_pair():
    maps, masks = _worked_example()
    masks[1] = np.zeros((3, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"pair 1: ground-truth mask shape \(3, 4\) != anomaly map shape \(3, 3\)"):
        au_pro(maps, masks)
    with pytest.raises(ValueError, match="pair 1"):
        pixel_auroc(maps, masks)


def test_bad_maps_and_masks_name_the_pair():
    maps, masks = _worked_example()
    with pytest.raises(ValueError, match="pair 0: anomaly map must be 2-D"):
        pro_curve([maps[0][None]] + maps[1:], [masks[0][None]] + masks[1:])
    nan_map = maps[1].copy()
    nan_map[0, 0] = np.nan
    with pytest.raises(ValueError, match="pair 1: anomaly map contains NaN"):
        pro_curve([maps[0], nan_map], masks)
    grey = masks[0].copy()
    grey[1, 1] = 128
    with pytest.raises(ValueError, match="pair 0: ground-truth mask must be bool.*128"):
        pro_curve(maps, [grey, masks[1]])


def test_needs_a_region_and_an_ok_pixel():
    empty = [np.zeros((3, 3), dtype=bool)] * 2
    with pytest.raises(ValueError, match="none of the 2 ground-truth masks contains an anomalous region"):
        au_pro([np.zeros((3, 3))] * 2, empty)
    with pytest.raises(ValueError, match="no OK pixel"):
        au_pro([np.zeros((3, 3))], [np.ones((3, 3), dtype=bool)])


def test_integration_limit_range():
    with pytest.raises(ValueError, match="integration_limit"):
        au_pro(*_worked_example(), integration_limit=0.0)
    with pytest.raises(ValueError, match="integration_limit"):
        au_pro(*_worked_example(), integration_limit=1.5)
