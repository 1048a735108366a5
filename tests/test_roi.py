"""Regions of interest: `--roi` is recorded in the manifest and applied in training, evaluate and
the runtime (regions reported in frame pixels); `edgestad roi` proposes one from good images."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgestad.cli import main
from edgestad.images import DataError, crop_roi, parse_roi

ROI = (8, 4, 48, 40)          # x, y, w, h inside the 64 x 64 tiny images


def _framed_dataset(src: Path, dst: Path) -> Path:
    """The tiny demo set pasted at ROI's place into a bigger, static grey frame (masks alike)."""
    x, y, w, h = ROI
    for path in sorted(src.rglob("*.png")):
        rel = path.relative_to(src)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        frame = np.full((64, 64) + img.shape[2:], 60 if img.ndim == 3 else 0, np.uint8)
        frame[y:y + h, x:x + w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), frame)
    return dst


def test_parse_and_crop_name_what_is_wrong():
    assert parse_roi("1, 2,3,4") == (1, 2, 3, 4)
    for bad in ("1,2,3", "a,b,c,d", "-1,0,4,4", "0,0,0,4"):
        with pytest.raises(DataError, match="--roi"):
            parse_roi(bad)
    img = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert crop_roi(img, (2, 3, 4, 5), "x.png").tolist() == img[3:8, 2:6].tolist()
    with pytest.raises(DataError, match="x.png: the region of interest x=8"):
        crop_roi(img, (8, 0, 4, 4), "x.png")


def test_roi_proposal_finds_where_good_parts_differ(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(12):
        frame = np.full((120, 160, 3), 80, np.uint8)           # static fixture
        frame[30:90, 50:130] = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)  # the part
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    preview = tmp_path / "roi.png"
    r = CliRunner().invoke(main, ["roi", str(folder), "--preview", str(preview), "--margin", "0"])
    assert r.exit_code == 0, r.output
    x, y, w, h = parse_roi(r.output.split("--roi ")[1].split()[0])
    assert abs(x - 50) <= 4 and abs(y - 30) <= 4 and abs(x + w - 130) <= 4 and abs(y + h - 90) <= 4
    assert cv2.imread(str(preview)).shape == (120, 160, 3)


def test_train_evaluate_and_run_inside_the_roi(tiny_dataset, tmp_path):
    pytest.importorskip("torch")
    from edgestad.bundle import load_bundle
    data = _framed_dataset(tiny_dataset, tmp_path / "data")
    bundle = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", str(data), "--out", str(bundle), "--epochs", "1",
                                  "--batch-size", "4", "--input-size", "32",
                                  "--roi", ",".join(map(str, ROI))])
    assert r.exit_code == 0, r.output
    manifest = load_bundle(bundle).manifest
    assert manifest["input"]["roi"] == list(ROI)
    # how evaluate, int8 calibration and the studies read an image of this bundle
    assert load_bundle(bundle).reading == {"size": (32, 32), "resize": "area_or_linear",
                                           "roi": list(ROI)}
    r = CliRunner().invoke(main, ["evaluate", str(bundle), str(data), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["roi"] == list(ROI) and 0 <= report["au_pro"] <= 1
    r = CliRunner().invoke(main, ["export", str(bundle), "--precision", "fp32", "--no-engine"])
    assert r.exit_code == 0, r.output

    # the runtime crops every frame to the region, and reports regions in frame pixels
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    pre = Preprocessor(InputSpec.from_manifest(manifest))
    frame = cv2.imread(str(next((data / "test").rglob("*.png"))))
    tensor = pre(frame)
    x, y, w, h = ROI
    expected = cv2.cvtColor(cv2.resize(frame[y:y + h, x:x + w], (32, 32), interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
    assert np.array_equal(tensor, expected)
    with pytest.raises(Exception, match="region of interest"):
        pre(frame[:20, :20])
    events = tmp_path / "events"
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted((data / "test").rglob("*.png"))[:6]):
        cv2.imwrite(str(folder / f"{i:02d}.png"), cv2.imread(str(path)))
    r = CliRunner().invoke(main, ["run", str(bundle), "--folder", str(folder), "--events", str(events),
                                  "--events-all", "--max-reconnects", "0", "--pixel-threshold", "0"])
    assert r.exit_code == 0, r.output
    parts = [json.loads(line) for line in (events / "events.jsonl").read_text().splitlines()]
    parts = [e for e in parts if e["event"] in ("ok", "ng", "review")]
    assert len(parts) == 6
    for e in parts:
        assert e["frame_size"] == [64, 64]
        for region in e["regions"]:
            bx, by, bw, bh = region["bbox"]
            assert x <= bx and y <= by and bx + bw <= x + w and by + bh <= y + h
    assert any(e["regions"] for e in parts)          # pixel threshold 0: every part has regions


def test_bad_roi_is_one_line_and_exit_2(tiny_dataset, tmp_path):
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--roi", "0,0,5"])
    assert r.exit_code == 2 and "--roi" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(tmp_path / "b"),
                                  "--epochs", "1", "--roi", "0,0,500,500"])
    assert r.exit_code == 2 and "region of interest" in r.output


def test_a_few_real_defects_set_the_image_threshold_for_a_recall_target(tiny_dataset, tmp_path):
    """`train --defects DIR --recall R` and `thresholds --defects DIR --recall R`: the highest
    threshold that makes R of the defective images NG, its good-part cost from the validation
    scores, recorded with its rule."""
    pytest.importorskip("torch")
    from edgestad.bundle import load_bundle
    defects = tmp_path / "defects"
    defects.mkdir()
    for i, path in enumerate(sorted((tiny_dataset / "test").glob("*/*.png"))):
        if path.parent.name != "good":
            cv2.imwrite(str(defects / f"{i:02d}.png"), cv2.imread(str(path)))
    n = len(list(defects.iterdir()))
    bundle = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(bundle), "--epochs", "1",
                                  "--batch-size", "4", "--input-size", "32",
                                  "--defects", str(defects), "--recall", "0.5"])
    assert r.exit_code == 0, r.output
    assert "image threshold from" in r.output
    thr = load_bundle(bundle).thresholds
    found = thr["rule"]["defects"]
    assert found["defects"] == n and found["caught"] == -(-n // 2) and found["recall"] >= 0.5
    assert "expected_good_ng" in found
    # the same rule on the exported graph, torch-free, through `edgestad thresholds`
    assert CliRunner().invoke(main, ["export", str(bundle), "--precision", "fp32",
                                     "--no-engine"]).exit_code == 0
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--defects", str(defects),
                                  "--recall", "1.0", "--reason", "catch every known defect"])
    assert r.exit_code == 0, r.output
    b = load_bundle(bundle)
    assert b.thresholds["rule"]["defects"]["caught"] == n
    assert b.thresholds["image"] <= thr["image"]
    assert "--defects" in b.manifest["thresholds_history"][-1]["rule"]
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--defects", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--defects" in r.output
