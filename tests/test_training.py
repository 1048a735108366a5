"""Teacher pretraining, student training, calibration and the bundle they produce."""
import json
import subprocess
import sys

import pytest
import torch

from edgestad.bundle import load_bundle
from edgestad.images import DataError, list_images
from edgestad.methods import load_model
from edgestad.methods.uninformed_students.model import UninformedStudentsConfig as StudentTeacherConfig
from edgestad.methods.uninformed_students import teacher as teacher_mod
from edgestad.methods.uninformed_students.teachers import load_teacher, read_teacher_file
from edgestad.methods.base import TrainSettings
from edgestad.train import fit as fit_mod
from edgestad.methods.uninformed_students.teacher import (TeacherConfig, decorrelation_loss,
                                    mean_abs_offdiag_correlation, pretrain_teacher,
                                    triplet_loss)


def test_decorrelation_and_triplet_losses_by_hand():
    # Orthogonal centred columns: no correlation, loss 0.
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(decorrelation_loss(x)) == pytest.approx(0.0, abs=1e-6)
    # Identical columns: correlation 1 off the diagonal, twice.
    y = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert float(decorrelation_loss(y)) == pytest.approx(2.0, abs=1e-5)
    assert mean_abs_offdiag_correlation(y) == pytest.approx(1.0)
    a, p, n = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    # δ⁺ = 1, δ⁻ = min(|a−n|², |p−n|²) = min(9, 10) = 9 → max(0, 1 + 1 − 9) = 0
    assert float(triplet_loss(a, p, n, margin=1.0)) == 0.0
    # anchor swap: the positive is closer to the negative → δ⁻ = 0.5² = 0.25 → 1 + 1 − 0.25
    n2 = torch.tensor([[1.5, 0.0]])
    assert float(triplet_loss(a, p, n2, margin=1.0)) == pytest.approx(1.75)


def test_teacher_pretraining_resumes_bit_exactly(tiny_dataset, tmp_path, monkeypatch):
    images = list_images(tiny_dataset / "train" / "good")
    cfg = TeacherConfig(patch_size=17, descriptor_dim=8, width=4, iterations=6, batch_size=8,
                        cnn_input_size=32)
    straight = pretrain_teacher(images, tmp_path / "straight", cfg, checkpoint_every=2,
                                log_every=2, progress=False)

    calls = {"n": 0}
    real_sample = teacher_mod.PatchSampler.sample

    def interrupted(self, n):
        calls["n"] += 1
        if calls["n"] == 5:          # dies during step 5; the checkpoint of step 4 survives
            raise KeyboardInterrupt
        return real_sample(self, n)

    monkeypatch.setattr(teacher_mod.PatchSampler, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_teacher(images, tmp_path / "resumed", cfg, checkpoint_every=2, log_every=2,
                         progress=False)
    monkeypatch.setattr(teacher_mod.PatchSampler, "sample", real_sample)
    resumed = pretrain_teacher(images, tmp_path / "resumed", cfg, checkpoint_every=2,
                               log_every=2, progress=False)
    a, meta_a = read_teacher_file(straight)
    b, meta_b = read_teacher_file(resumed)
    assert meta_b["iterations"] == 6
    assert [h["iteration"] for h in meta_b["history"]] == [2, 4, 6]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    net, meta = load_teacher(resumed)
    assert net.patch_size == 17 and meta["pretrained_cnn"]["name"] == "efficientnet-lite0"
    assert 0 <= meta["holdout_quality"]["mean_abs_offdiag_correlation"] <= 1


def _settings(**kw):
    return {"epochs": 2, "crop_size": 32, "val_fraction": 0.25, **kw}


def train_bundle(data, out, config, settings: dict, teachers=(), progress=False):
    """Uninformed Students through the generic driver (batch size 1, the method's default)."""
    crop = settings.pop("crop_size", None)
    options = {"teachers": tuple(str(t) for t in teachers), "crop_size": crop}
    return fit_mod.train_bundle(data, out, "uninformed_students", config,
                                TrainSettings(options=options, **settings), progress=progress,
                                echo=lambda *_: None)


def _config(**kw):
    return StudentTeacherConfig(**{"patch_sizes": (17,), "num_students": 2,
                                   "input_size": (64, 64), **kw})


def test_train_bundle_end_to_end(tiny_dataset, tiny_teachers, tmp_path):
    out = train_bundle(tiny_dataset, tmp_path / "bundle", _config(patch_sizes=(17, 33)),
                       _settings(epochs=3), teachers=[tiny_teachers[17], tiny_teachers[33]],
                       progress=False)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["method_config"]["descriptor_dim"] == 8 and m["method_config"]["width"] == 4
    assert m["provenance"]["images"] == {"train": 10, "validation": 4}
    assert set(m["score_stats"]) == {"17", "33"}
    assert m["thresholds"]["pixel"] < m["thresholds"]["image"]
    assert not (tmp_path / ".bundle.partial").exists()
    model = load_model(bundle)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    amap, score = model(images)
    assert amap.shape == (2, 1, 64, 64) and torch.isfinite(amap).all()
    # After calibration e and v are standardised on the validation images.
    from edgestad.datasets import load_images, good_images, split_train_val
    _, val = split_train_val(good_images(tiny_dataset), 0.25, 0)
    x = model.normalize_input(torch.from_numpy(load_images(val, (64, 64))).permute(0, 3, 1, 2))
    with torch.no_grad():
        e, v = model.error_and_variance(x, 17)
    st = model.score_stats_17
    assert float(((e - st[0]) / st[1]).mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(((e - st[0]) / st[1]).std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_bad_inputs_name_the_problem(tmp_path, tiny_teachers, tiny_dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        train_bundle(empty, tmp_path / "x", _config(), _settings(), [tiny_teachers[17]],
                     progress=False)
    with pytest.raises(ValueError, match="p=\\[33\\]"):
        train_bundle(tiny_dataset, tmp_path / "x", _config(), _settings(),
                     [tiny_teachers[17], tiny_teachers[33]], progress=False)
    not_a_teacher = tmp_path / "t.safetensors"
    not_a_teacher.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="t.safetensors"):
        train_bundle(tiny_dataset, tmp_path / "x", _config(), _settings(), [not_a_teacher],
                     progress=False)


def test_cli_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from edgestad.cli import main;"
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
            "assert 'pretrain-teacher' in r.output; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_train_and_evaluate(tiny_dataset, tiny_teachers, tmp_path):
    from click.testing import CliRunner
    from edgestad.cli import main
    bundle = tmp_path / "cli_bundle"
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(bundle), "-p", "17",
                                  "--teacher", str(tiny_teachers[17]), "--input-size", "64",
                                  "--epochs", "1", "--students", "2", "--crop-size", "32",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", str(bundle), str(tiny_dataset),
                                  "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= report["au_pro"] <= 1 and report["test_images"] == 10
    assert (tmp_path / "eval" / "pro_curve.png").stat().st_size > 1000
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) >= 3
    assert load_bundle(bundle).manifest["evaluation"]["au_pro"] == report["au_pro"]
    # one row per test image, its decision at the bundle's threshold; the counts agree
    import csv
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    d = report["decisions_at_bundle_threshold"]
    assert len(rows) == 10 and sum(int(r["label"]) for r in rows) == report["anomalous"]
    assert sum(r["decision"] == "NG" and r["label"] == "0" for r in rows) == d["good_ng"]
    assert sum(r["decision"] == "NG" and r["label"] == "1" for r in rows) == d["defective_ng"]
    assert all((float(r["score"]) > d["threshold"]) == (r["decision"] == "NG") for r in rows)
    lo, hi = d["good_rejected_interval_95"]
    assert lo <= d["good_rejected"] <= hi and "95 % interval" in r.output


def test_cli_edge_preset_trains_p65_at_dense_stride_4_and_options_override_it(tiny_dataset,
                                                                              tiny_teachers,
                                                                              tmp_path):
    from click.testing import CliRunner
    from edgestad.cli import main
    common = ["--input-size", "80", "--epochs", "1", "--students", "2", "--crop-size", "72",
              "--device", "cpu"]
    edge = tmp_path / "edge"   # the shipped p=65 teacher (width 64, d 128)
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(edge),
                                  "--preset", "edge", *common])
    assert r.exit_code == 0, r.output
    cfg = load_bundle(edge).manifest["method_config"]
    assert (cfg["patch_sizes"], cfg["dense_stride"], cfg["width"]) == ([65], 4, 64)
    override = tmp_path / "override"
    r = CliRunner().invoke(main, ["train", str(tiny_dataset), "--out", str(override),
                                  "--preset", "edge", "-p", "17", "--dense-stride", "2",
                                  "--teacher", str(tiny_teachers[17]), *common])
    assert r.exit_code == 0, r.output
    cfg = load_bundle(override).manifest["method_config"]
    assert (cfg["patch_sizes"], cfg["dense_stride"]) == ([17], 2)
