"""The Perlin pseudo-anomaly generator (common/perlin.py) and `edgestad synth-defects`."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgestad.methods.common.perlin import PseudoAnomalies, perlin_noise


def _good(seed: int, size=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (0, 0), 3)
    return np.ascontiguousarray(base)


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "textures"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"t{i}.png"), np.random.default_rng(10 + i).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return folder


@pytest.mark.parametrize("with_sources", [True, False])
def test_mask_is_exactly_the_changed_pixels_and_reproducible(with_sources, sources):
    files = sorted(sources.iterdir()) if with_sources else None
    image = _good(0)
    first = PseudoAnomalies(files, seed=7)
    results = [first(image) for _ in range(5)]
    for out, mask in results:
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert mask.any()
        np.testing.assert_array_equal(mask, (out != image).any(axis=-1))
    again = PseudoAnomalies(files, seed=7)
    for out, mask in results:
        out2, mask2 = again(image)
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(mask, mask2)
    other = PseudoAnomalies(files, seed=8)(image)
    assert not np.array_equal(other[1], results[0][1])


def test_perlin_noise_any_shape():
    rng = np.random.default_rng(0)
    noise = perlin_noise((50, 70), (4, 8), rng)
    assert noise.shape == (50, 70) and np.abs(noise).max() < 1.5 and noise.std() > 0.05


def _plain_folder(tmp_path, n=4):
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"g{i}.png"), cv2.cvtColor(_good(i), cv2.COLOR_RGB2BGR))
    return folder


def test_synth_defects_writes_mvtec_layout_with_exact_masks(tmp_path, sources):
    from edgestad.images import read_image, read_mask
    from edgestad.datasets import MVTecCategory
    from edgestad.synth import synth_defects
    data = _plain_folder(tmp_path)
    out = tmp_path / "synth"
    args = [str(data), "--out", str(out), "-n", "3", "--seed", "5", "--anomaly-source", str(sources)]
    run = CliRunner().invoke(synth_defects, args)
    assert run.exit_code == 0, run.output
    summary = json.loads((out / "synthetic.json").read_text())
    assert sorted(p.name for p in (out / "test" / "synthetic").iterdir()) == ["000.png", "001.png", "002.png"]
    items = MVTecCategory(out).test_items()                # evaluate's reader accepts the folder
    assert sum(i.is_anomalous for i in items) == 3 and sum(not i.is_anomalous for i in items) >= 1
    for entry in summary["images"]:
        image = read_image(out / entry["image"])
        mask = read_mask(out / "ground_truth" / "synthetic" / (entry["image"].split("/")[-1][:-4] + "_mask.png"))
        base = read_image(entry["from"])
        np.testing.assert_array_equal(mask, (image != base).any(axis=-1))
        assert mask.any()
    # the good copies are images that were not used as a base
    bases = {entry["from"] for entry in summary["images"]}
    assert all(str(data / p.split("/")[-1]) not in bases for p in summary["good_copies"])
    # same seed, same images
    out2 = tmp_path / "synth2"
    assert CliRunner().invoke(synth_defects, args[:2] + [str(out2)] + args[3:]).exit_code == 0
    for entry in summary["images"]:
        assert (out / entry["image"]).read_bytes() == (out2 / entry["image"]).read_bytes()


@pytest.mark.parametrize("case", ["missing", "empty", "n0", "out_not_empty", "bad_source"])
def test_synth_defects_one_line_errors(tmp_path, case):
    from edgestad.synth import synth_defects
    data = _plain_folder(tmp_path, n=2)
    out = tmp_path / "o"
    args = {"missing": [str(tmp_path / "nope"), "--out", str(out)],
            "empty": [str(tmp_path), "--out", str(out)],
            "n0": [str(data), "--out", str(out), "-n", "0"],
            "out_not_empty": [str(data), "--out", str(out), "-n", "1"],
            "bad_source": [str(data), "--out", str(out), "--anomaly-source", str(tmp_path / "x")]}[case]
    if case == "out_not_empty":
        (out / "test" / "synthetic").mkdir(parents=True)
        (out / "test" / "synthetic" / "000.png").write_bytes(b"x")
    run = CliRunner().invoke(synth_defects, args)
    assert run.exit_code == 2, run.output
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.output


def test_synth_defects_is_an_edgestad_command(tmp_path):
    from edgestad.cli import main
    data = _plain_folder(tmp_path, n=2)
    run = CliRunner().invoke(main, ["synth-defects", str(data), "--out", str(tmp_path / "o"), "-n", "1"])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "o" / "ground_truth" / "synthetic" / "000_mask.png").is_file()
    bad = CliRunner().invoke(main, ["synth-defects", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    assert bad.exit_code == 2
    assert [line for line in bad.output.splitlines() if line.strip()] == [
        f"error: DATA: {tmp_path / 'nope'}: no such folder"]
