"""edgestad.images, edgestad.datasets and edgestad.demo_data on real files written to tmp_path and on the shared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgestad.images import DataError, list_images, read_image, read_mask, resize_interpolation
from edgestad.datasets import (MVTecCategory, TestItem, data_root, fingerprint, good_images, load_images, load_test_set, require_dataset, split_train_val)
from edgestad.demo_data import DEFECT_TYPES, INFO_FILE, ensure_demo_dataset, make_demo_dataset


def _write(path: Path, array: np.ndarray, params: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array, params or [])
    return path


def _texture(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """A BGR test image with structure (JPEG of pure noise would be huge, of a flat colour tiny)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (np.sin(x / 3.0) * 60 + np.cos(y / 5.0) * 50 + 120).astype(np.float32)
    img = np.stack([base, base[::-1], base[:, ::-1]], axis=2) + rng.normal(0, 5, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- read_image


def test_color_png_is_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    bgr[..., 2] = 200  # red
    img = read_image(_write(tmp_path / "c.png", bgr))
    assert img.dtype == np.uint8 and img.shape == (4, 5, 3)
    assert (img[..., 0] == 200).all() and (img[..., 2] == 10).all()


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    img = read_image(_write(tmp_path / "g.png", gray))
    assert img.shape == (6, 10, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _write(tmp_path / "deep.png", values)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit on disk
    img = read_image(path)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, :, 0], [0, 1, 128, 255])


def test_bgra_png_drops_alpha(tmp_path):
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[..., 1] = 77
    bgra[..., 3] = 0  # fully transparent: the colour is still what we read
    img = read_image(_write(tmp_path / "a.png", bgra))
    assert img.shape == (3, 3, 3)
    assert (img[..., 1] == 77).all() and (img[..., 0] == 0).all()


def test_truncated_png_raises_naming_file(tmp_path):
    good = _write(tmp_path / "full.png", _texture())
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png") as err:
        read_image(cut)
    assert "truncated" in str(err.value)
    # Losing only the final IEND chunk is caught too (OpenCV would decode the pixels fine).
    cut.write_bytes(data[:-12])
    with pytest.raises(DataError, match="truncated PNG"):
        read_image(cut)


def test_truncated_jpeg_raises_naming_file(tmp_path):
    good = _write(tmp_path / "full.jpg", _texture(64, 64), [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = good.read_bytes()
    assert read_image(good).shape == (64, 64, 3)
    cut = tmp_path / "cut.jpg"
    for n in (len(data) - 2, len(data) * 2 // 3, 200):
        cut.write_bytes(data[:n])
        with pytest.raises(DataError, match="cut.jpg.*truncated JPEG"):
            read_image(cut)


def test_jpeg_with_trailing_bytes_and_progressive_jpeg_are_accepted(tmp_path):
    img = _texture(32, 48)
    prog = _write(tmp_path / "p.jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    assert read_image(prog).shape == (32, 48, 3)
    trailer = tmp_path / "t.JPG"
    trailer.write_bytes(prog.read_bytes() + b"\x00\x00camera trailer")
    assert read_image(trailer).shape == (32, 48, 3)


def test_non_image_and_missing_and_empty_files(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(DataError, match="notes.png.*not a readable image"):
        read_image(fake)
    with pytest.raises(DataError, match="nope.png.*does not exist"):
        read_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png.*empty"):
        read_image(empty)
    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path)


def test_resize_sizes_and_interpolation(tmp_path):
    path = _write(tmp_path / "i.png", _texture(40, 56))
    assert read_image(path, size=(20, 28)).shape == (20, 28, 3)
    assert read_image(path, size=(100, 80)).shape == (100, 80, 3)
    assert read_image(path, size=(40, 56)).shape == (40, 56, 3)
    assert resize_interpolation((40, 56), (20, 28)) == cv2.INTER_AREA
    assert resize_interpolation((40, 56), (80, 28)) == cv2.INTER_LINEAR
    # Shrinking averages (INTER_AREA): a 2x2 checkerboard shrunk 2x is flat grey.
    board = np.indices((8, 8)).sum(0) % 2 * 200
    flat = read_image(_write(tmp_path / "b.png", board.astype(np.uint8)), size=(4, 4))
    assert (flat == 100).all()
    for bad in [(0, 5), (5,), "ab"]:
        with pytest.raises(DataError, match="size"):
            read_image(path, size=bad)


def test_read_mask_binarises_and_resizes_nearest(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    m[0, 0] = 127  # not foreground
    m[7, 7] = 128  # foreground
    mask = read_mask(_write(tmp_path / "m_mask.png", m))
    assert mask.dtype == bool and mask.sum() == 17 and not mask[0, 0]
    big = read_mask(tmp_path / "m_mask.png", size=(16, 16))
    assert big.dtype == bool and big.shape == (16, 16) and set(np.unique(big)) <= {False, True}
    assert big.sum() == 17 * 4
    empty = read_mask(_write(tmp_path / "z_mask.png", np.zeros((5, 7), np.uint8)), size=(10, 14))
    assert empty.shape == (10, 14) and not empty.any()


# --------------------------------------------------------------------------- folders, MVTec layout


def test_list_images_sorted_case_insensitive_and_errors(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.bmp", "e.tif", "f.TIFF"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._a.png").write_bytes(b"x")  # macOS resource fork
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp", "e.tif", "f.TIFF"]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_dir.*no images"):
        list_images(empty)
    with pytest.raises(DataError, match="missing_dir.*does not exist"):
        list_images(tmp_path / "missing_dir")


def _make_category(root: Path, n_train: int = 5) -> Path:
    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}.png", _texture(seed=i))
    _write(root / "test" / "good" / "000.png", _texture(seed=100))
    _write(root / "test" / "crack" / "000.png", _texture(seed=101))
    m = np.zeros((40, 56), np.uint8)
    m[10:20, 5:15] = 255
    _write(root / "ground_truth" / "crack" / "000_mask.png", m)
    _write(root / "test" / "crack" / "001.png", _texture(seed=102))
    _write(root / "ground_truth" / "crack" / "001_mask.png", np.zeros((40, 56), np.uint8))  # empty
    return root


def test_mvtec_reader_on_small_category(tmp_path):
    cat = MVTecCategory(_make_category(tmp_path / "widget"))
    assert cat.name == "widget" and len(cat.train_good()) == 5
    assert cat.defect_types() == ["crack"]
    items = cat.test_items()
    assert [(i.defect_type, i.path.name, i.is_anomalous) for i in items] == [
        ("crack", "000.png", True),
        ("crack", "001.png", True),
        ("good", "000.png", False),
    ]
    assert items[0].mask_path == tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png"
    assert items[2].mask_path is None
    assert isinstance(items[0], TestItem)

    images, masks, labels, types, paths = load_test_set(cat, (20, 28))
    assert images.shape == (3, 20, 28, 3) and images.dtype == np.uint8
    assert masks.shape == (3, 20, 28) and masks.dtype == bool
    assert labels.tolist() == [1, 1, 0] and types == ["crack", "crack", "good"]
    assert paths == [i.path for i in items]
    assert masks[0].sum() == 5 * 5  # 10x10 block at half size
    assert not masks[1].any()  # the all-zero mask of an anomalous image is valid
    assert not masks[2].any()


def test_defect_image_without_mask_is_named(tmp_path):
    root = _make_category(tmp_path / "widget")
    _write(root / "test" / "crack" / "007.png", _texture(seed=7))
    with pytest.raises(DataError) as err:
        MVTecCategory(root).test_items()
    msg = str(err.value)
    assert str(root / "test" / "crack" / "007.png") in msg
    assert str(root / "ground_truth" / "crack" / "007_mask.png") in msg


def test_mask_of_other_size_is_an_error(tmp_path):
    root = _make_category(tmp_path / "widget")
    _write(root / "ground_truth" / "crack" / "000_mask.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="000_mask.png is 20x20 but its image .*000.png is 56x40"):
        load_test_set(root, (16, 16))


def test_not_a_category_and_good_images(tmp_path):
    with pytest.raises(DataError, match="not an MVTec-layout category"):
        MVTecCategory(tmp_path)
    root = _make_category(tmp_path / "widget")
    assert good_images(root) == MVTecCategory(root).train_good()
    plain = root / "train" / "good"
    assert good_images(plain) == list_images(plain)


def test_load_images_keeps_order(tmp_path):
    paths = [_write(tmp_path / f"{i}.png", np.full((9, 7), i * 40, np.uint8)) for i in range(4)]
    batch = load_images(paths[::-1], (3, 5))
    assert batch.shape == (4, 3, 5, 3) and batch.dtype == np.uint8
    assert batch[:, 0, 0, 0].tolist() == [120, 80, 40, 0]
    with pytest.raises(DataError, match="no image paths"):
        load_images([], (3, 5))


# --------------------------------------------------------------------------- split, fingerprint


def test_split_is_deterministic_and_independent_of_order_and_location(tmp_path):
    names = [f"img_{i:03d}.png" for i in range(50)]
    a = [tmp_path / "a" / n for n in names]
    train, val = split_train_val(a, val_fraction=0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(a)
    assert train == sorted(train) and val == sorted(val)
    shuffled = list(np.random.default_rng(1).permutation(a))
    assert split_train_val(shuffled, val_fraction=0.2, seed=3) == (train, val)
    assert split_train_val(a + a[:5], val_fraction=0.2, seed=3) == (train, val)  # duplicates once
    # The same images in another folder split the same way.
    _, val_b = split_train_val([tmp_path / "elsewhere" / n for n in names], val_fraction=0.2, seed=3)
    assert [p.name for p in val_b] == [p.name for p in val]
    assert split_train_val(a, val_fraction=0.2, seed=4)[1] != val
    # min_val and the limits.
    assert len(split_train_val(a[:5], val_fraction=0.01, min_val=2)[1]) == 2
    assert split_train_val(a[:5], val_fraction=0.0, min_val=0)[1] == []
    with pytest.raises(DataError, match="cannot split 1 image"):
        split_train_val(a[:1], 0.2)
    with pytest.raises(DataError, match="val_fraction"):
        split_train_val(a, val_fraction=1.0)



def test_bundle_split_finds_the_images_a_bundle_was_made_from(tiny_dataset, tmp_path):
    """The recorded fraction and seed, the recorded folder or another copy of it; bundles without a
    split record were split at 0.1, seed 0; a bundle without a data folder is named as such."""
    import shutil
    from edgestad.datasets import LEGACY_SPLIT, bundle_split
    provenance = {"data": str(tiny_dataset), "split": {"val_fraction": 0.25, "seed": 1}}
    train, val = bundle_split(provenance)
    assert (train, val) == split_train_val(good_images(tiny_dataset), 0.25, 1)
    assert len(val) == 4 and len(train) == 10
    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    _, val_copy = bundle_split(provenance, copy)
    assert [p.name for p in val_copy] == [p.name for p in val]
    assert all(copy in p.parents for p in val_copy)
    legacy = bundle_split({"data": str(tiny_dataset)})
    assert legacy == split_train_val(good_images(tiny_dataset), **LEGACY_SPLIT) != (train, val)
    with pytest.raises(DataError, match="no data folder"):
        bundle_split({"split": {"val_fraction": 0.2, "seed": 0}})

def test_fingerprint_tracks_content_not_order_or_location(tmp_path):
    paths = [_write(tmp_path / "a" / f"{i}.png", _texture(seed=i)) for i in range(3)]
    fp = fingerprint(paths)
    assert len(fp) == 64 and fp == fingerprint(paths[::-1])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fingerprint(sorted((tmp_path / "b").iterdir())) == fp
    _write(paths[1], _texture(seed=99))
    assert fingerprint(paths) != fp
    assert fingerprint(paths[:2]) != fingerprint(paths)
    with pytest.raises(DataError, match="gone.png"):
        fingerprint([tmp_path / "gone.png"])


def test_data_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTAD_DATA", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    with pytest.raises(DataError, match="no_such_set.*not found"):
        require_dataset("no_such_set")
    monkeypatch.delenv("EDGESTAD_DATA")
    assert data_root() == (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()


# --------------------------------------------------------------------------- real shared datasets


def _real(relpath: str) -> MVTecCategory:
    try:
        return MVTecCategory(require_dataset(relpath))
    except DataError as exc:
        pytest.skip(f"real dataset absent: {exc}")


def test_mvtec_bottle_counts():
    cat = _real("mvtec_ad/bottle")
    assert len(cat.train_good()) == 209
    assert cat.defect_types() == ["broken_large", "broken_small", "contamination"]
    items = cat.test_items()
    counts = {}
    for it in items:
        counts[it.defect_type] = counts.get(it.defect_type, 0) + 1
    assert counts == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    img = read_image(items[0].path)
    assert img.shape == (512, 512, 3)
    assert read_mask(items[0].mask_path).shape == (512, 512)


def test_magnetic_tile_counts_and_empty_masks():
    cat = _real("magnetic_tile/magnetic_tile")
    assert len(cat.train_good()) == 666
    items = cat.test_items()
    counts = {}
    for it in items:
        counts[it.defect_type] = counts.get(it.defect_type, 0) + 1
    assert counts == {"good": 286, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    # Grayscale tiles of varying size come out RGB at the requested size.
    assert read_image(cat.train_good()[0], size=(64, 64)).shape == (64, 64, 3)
    # Every mask matches its image's size (load_test_set checks it) and the four documented
    # all-zero `uneven` masks load as valid, anomalous, empty masks.
    _, masks, labels, types, paths = load_test_set(cat, (32, 32))
    assert labels.sum() == 392 and (labels == 0).sum() == 286
    empty = {p.stem for p, m, lab in zip(paths, masks, labels) if lab and not m.any()}
    assert {"exp4_num_45057", "exp4_num_352527", "exp3_num_45042", "exp4_num_124690"} <= empty


# --------------------------------------------------------------------------- demo dataset


def test_demo_dataset_layout_masks_and_determinism(tmp_path):
    root = make_demo_dataset(tmp_path / "brick", texture="brick", size=64, n_train=12, n_test_good=4, n_test_defect=7, seed=5)
    cat = MVTecCategory(root)
    assert len(cat.train_good()) == 12
    assert cat.defect_types() == sorted(DEFECT_TYPES)
    items = cat.test_items()
    assert sum(not it.is_anomalous for it in items) == 4
    assert sum(it.is_anomalous for it in items) == 7
    assert {it.defect_type for it in items if it.is_anomalous} == set(DEFECT_TYPES)
    for it in items:
        img = read_image(it.path)
        assert img.shape == (64, 64, 3)
        if it.is_anomalous:
            mask = read_mask(it.mask_path)
            assert mask.shape == (64, 64) and mask.any() and not mask.all()
    images, masks, labels, _, _ = load_test_set(cat, (64, 64))
    assert labels.sum() == 7 and masks[labels == 1].reshape(7, -1).any(axis=1).all()

    again = make_demo_dataset(tmp_path / "again", texture="brick", size=64, n_train=12, n_test_good=4, n_test_defect=7, seed=5)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_demo_dataset(tmp_path / "other", texture="brick", size=64, n_train=12, n_test_good=4, n_test_defect=7, seed=6)
    assert (other / "train/good/000.png").read_bytes() != (root / "train/good/000.png").read_bytes()


def test_demo_defects_stand_out_from_textured_surroundings(tmp_path):
    root = make_demo_dataset(tmp_path / "gravel", texture="gravel", size=64, n_train=2, n_test_good=0, n_test_defect=6)
    for it in MVTecCategory(root).test_items():
        img = read_image(it.path)[..., 0].astype(np.float32)
        mask = read_mask(it.mask_path)
        assert img[~mask].std() > 5  # the background is texture, not a flat fill
        if it.defect_type in ("scratch", "stain"):  # intensity defects: darker or brighter
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
            assert abs(img[mask].mean() - img[ring].mean()) > 15, it.path


def test_ensure_demo_dataset_is_idempotent_and_refuses_other_folders(tmp_path):
    root = tmp_path / "demo" / "grass"
    assert ensure_demo_dataset(root, texture="grass", size=32, n_train=4, n_test_good=2, n_test_defect=3) == root
    stamp = (root / INFO_FILE).stat().st_mtime_ns
    ensure_demo_dataset(root, texture="grass", size=32, n_train=4, n_test_good=2, n_test_defect=3)
    assert (root / INFO_FILE).stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in root.parent.iterdir()] == ["grass"]  # no temp folders left behind
    with pytest.raises(DataError, match="size=32 \\(wanted 48\\)"):
        ensure_demo_dataset(root, texture="grass", size=48, n_train=4, n_test_good=2, n_test_defect=3)
    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a generated demo dataset"):
        ensure_demo_dataset(foreign)
    with pytest.raises(DataError, match="not empty"):
        make_demo_dataset(foreign)
    with pytest.raises(DataError, match="unknown demo texture"):
        make_demo_dataset(tmp_path / "x", texture="marble")
