"""Thresholds and score statistics are protected: the decision digest, graphs whose baked
thresholds must equal the manifest's, `edgestad thresholds`, and fleet signing. Torch-free: toy
graphs and bundles (tests/test_runtime_toy.py), the real CLI through click's CliRunner."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgestad import bundle_thresholds, graph_meta, signing, thresholds as threshold_rules
from edgestad.bundle import BundleError, DecisionDigestError, add_files, load_bundle, write_bundle
from edgestad.files import atomic_write_json
from edgestad.cli import main

from test_runtime_toy import IMAGE_THRESHOLD, PIXEL_THRESHOLD, toy_graph, write_folder

SIZE = 64


def _validation_rule(seed: int = 0):
    """(thresholds as bundles trained with the older normal-fit image rule hold them, the
    validation pixels, the validation image scores); the pixel table is the one
    ``edgestad.thresholds.fit_thresholds`` writes."""
    from statistics import NormalDist
    rng = np.random.default_rng(seed)
    pixels = rng.random(20 * 32 * 32) * 0.9
    scores = rng.normal(0.6, 0.05, 20)
    mu, sigma = float(scores.mean()), float(scores.std(ddof=1))
    z = NormalDist().inv_cdf(0.99)
    fitted = threshold_rules.fit_thresholds(pixels.reshape(20, 32, 32), scores, pixel_fpr=0.001)
    thresholds = {"pixel": fitted["pixel"], "image": mu + z * sigma,
                  "rule": {"pixel": "quantile 0.999 of validation good pixels", "pixel_fpr": 0.001,
                           "image": "normal fit", "image_false_reject": 0.01,
                           "validation_score_mean": mu, "validation_score_std": sigma,
                           "validation_score_max": float(scores.max()), "validation_images": 20,
                           "validation_pixel_quantiles": fitted["rule"]["validation_pixel_quantiles"]}}
    return thresholds, pixels, scores


def _baked(graph: bytes, thresholds: dict, **extra) -> bytes:
    """A graph with metadata as export/exporter.py writes it."""
    return graph_meta.set_metadata(graph, {"edgestad.format": "edgestad-onnx/1",
                                           "thresholds": json.dumps(thresholds, sort_keys=True),
                                           **extra})


def make_bundle(path: Path, thresholds: dict | None = None, baked: dict | None = None,
                fp16: bool = False, engine: bool = False) -> Path:
    """A toy bundle whose graphs carry ``baked`` thresholds (default: the manifest's)."""
    import hashlib
    thresholds = thresholds or {"pixel": PIXEL_THRESHOLD, "image": IMAGE_THRESHOLD,
                                "rule": {"toy": "brightness"}}
    fp32 = _baked(toy_graph(SIZE, SIZE), baked or thresholds)
    files = {"model.onnx": fp32}
    onnx_map = {"fp32": "model.onnx"}
    if fp16:
        files["model.fp16.onnx"] = _baked(toy_graph(SIZE, SIZE), baked or thresholds,
                                          source_fp32_sha256=hashlib.sha256(fp32).hexdigest())
        onnx_map["fp16"] = "model.fp16.onnx"
    exports = {"onnx": onnx_map,
               "onnx_sha256": {p: hashlib.sha256(files[n]).hexdigest() for p, n in onnx_map.items()},
               "engines": []}
    if engine:
        files["model.fp16.test.engine"] = b"not really a plan"
        files["model.fp16.test.engine.json"] = b"{}"
        exports["engines"] = [{"file": "model.fp16.test.engine", "sidecar": "model.fp16.test.engine.json",
                               "precision": "fp16", "onnx": "model.fp16.onnx",
                               "onnx_sha256": exports["onnx_sha256"]["fp16"]}]
    manifest = {
        "method": "uninformed_students", "method_config": {"toy": True},
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "color": "RGB", "layout": "NCHW",
                  "dtype": "uint8", "resize": "area_or_linear", "mean": [0.485, 0.456, 0.406],
                  "std": [0.229, 0.224, 0.225]},
        "thresholds": thresholds, "score_stats": {"mean": 0.1, "std": 0.2}, "image_score": "max",
        "exports": exports,
    }
    return write_bundle(path, manifest, {"toy.bias": np.zeros(1, np.float32)}, extra_files=files)


def _edit(bundle: Path, edit) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    atomic_write_json(bundle / "manifest.json", m)


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------ the digest


def test_a_hand_edited_threshold_is_named_at_load(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    digest = json.loads((bundle / "manifest.json").read_text())["decision_digest"]
    assert {"thresholds.image", "thresholds.pixel", "score_stats", "input", "method",
            "method_config", "image_score"} <= set(digest["sections"])
    load_bundle(bundle)
    _edit(bundle, lambda m: m["thresholds"].update(image=99.0))
    with pytest.raises(DecisionDigestError) as info:
        load_bundle(bundle)
    assert info.value.sections == ["thresholds.image"]
    assert "thresholds.image differs from what training or `edgestad thresholds` recorded" in str(info.value)


@pytest.mark.parametrize("section, edit", [
    ("score_stats.std", lambda m: m["score_stats"].update(std=1.0)),
    ("input.mean", lambda m: m["input"].update(mean=[0, 0, 0])),
    ("method_config.toy", lambda m: m["method_config"].update(toy=False)),
    ("image_score", lambda m: m.update(image_score="topk:0.01")),
    ("thresholds.rule", lambda m: m["thresholds"]["rule"].update(toy="x")),
])
def test_every_decision_section_is_covered(tmp_path, section, edit):
    bundle = make_bundle(tmp_path / "b")
    _edit(bundle, edit)
    with pytest.raises(DecisionDigestError, match=section.replace(".", r"\.")):
        load_bundle(bundle)


def test_a_removed_digest_is_refused_and_seal_is_the_way_back(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    _edit(bundle, lambda m: m.pop("decision_digest"))
    with pytest.raises(DecisionDigestError, match="--seal"):
        load_bundle(bundle)
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--seal", "--reason", "legacy bundle"])
    assert r.exit_code == 0, r.output
    m = load_bundle(bundle).manifest
    assert m["thresholds_history"][-1]["change"] == "seal"
    assert m["thresholds_history"][-1]["reason"] == "legacy bundle"


def _make_legacy(bundle: Path) -> Path:
    """What edgestad wrote before the digest existed: format version 1, no decision_digest."""
    def legacy(m):
        m.pop("decision_digest")
        m["format_version"] = 1
    _edit(bundle, legacy)
    return bundle


def test_a_legacy_bundle_still_runs_with_a_warning_until_sealed(tmp_path, caplog):
    """Bundles already on devices keep running after an upgrade (warned, unprotected); sealing
    upgrades them; a signature needs the digest."""
    bundle = _make_legacy(make_bundle(tmp_path / "b"))
    with caplog.at_level("WARNING", logger="edgestad.bundle"):
        assert load_bundle(bundle).legacy
    assert "--seal" in caplog.text
    folder = write_folder(tmp_path / "frames", 2)
    assert _run(bundle, folder).exit_code == 0
    add_files(bundle, {"notes.txt": b"x"})  # e.g. export: stays legacy, gets no digest
    assert load_bundle(bundle).legacy
    keys = signing.keygen(tmp_path / "keys")
    line = _one_error_line(CliRunner().invoke(main, ["sign", str(bundle), "--key", str(keys[0])]), 2)
    assert "--seal" in line
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--seal"])
    assert r.exit_code == 0, r.output
    sealed = load_bundle(bundle)
    assert not sealed.legacy and sealed.manifest["format_version"] == 2
    assert "format version 1" in sealed.manifest["thresholds_history"][-1]["rule"]
    assert CliRunner().invoke(main, ["sign", str(bundle), "--key", str(keys[0])]).exit_code == 0
    assert _run(bundle, folder, "--trusted-key", str(keys[1])).exit_code == 0
    # a threshold change seals a legacy bundle too
    other = _make_legacy(make_bundle(tmp_path / "c"))
    assert CliRunner().invoke(main, ["thresholds", str(other), "--image-threshold", "0.7"]).exit_code == 0
    assert not load_bundle(other).legacy


def test_add_files_does_not_launder_a_hand_edit(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    _edit(bundle, lambda m: m["thresholds"].update(pixel=0.01))
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(DecisionDigestError, match="thresholds.pixel"):
        add_files(bundle, {"notes.txt": b"x"}, {"evaluation": {"au_pro": 1.0}})
    assert (bundle / "manifest.json").read_bytes() == before
    # legitimate changes through add_files are re-digested
    add_files(make_bundle(tmp_path / "c"), {}, {"thresholds": {"image": 0.5}})
    assert load_bundle(tmp_path / "c").thresholds["image"] == 0.5


def test_thresholds_history_is_covered_too(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    assert CliRunner().invoke(main, ["thresholds", str(bundle), "--image-threshold", "0.7"]).exit_code == 0
    _edit(bundle, lambda m: m["thresholds_history"][0].update(by="someone else"))
    with pytest.raises(DecisionDigestError, match="thresholds_history"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------ graphs


def test_graph_metadata_rewrite_keeps_the_network_and_other_metadata():
    graph = _baked(toy_graph(SIZE, SIZE), {"pixel": 1.0}, producer="edgestad")
    rewritten = graph_meta.set_metadata(graph, {"thresholds": json.dumps({"pixel": 2.0})})
    model = onnx.load_from_string(rewritten)
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["thresholds"] == '{"pixel": 2.0}' and meta["producer"] == "edgestad"
    assert model.graph == onnx.load_from_string(graph).graph
    assert graph_meta.read_metadata(rewritten) == meta


def _run(bundle: Path, folder: Path, *extra, config: Path | None = None):
    args = ["run", str(bundle), "--folder", str(folder), "--max-reconnects", "0", *extra]
    if config is not None:
        args = ["run", "--config", str(config), *extra]
    return CliRunner().invoke(main, args)


def test_run_refuses_a_graph_whose_baked_thresholds_differ(tmp_path):
    folder = write_folder(tmp_path / "frames", 3)
    good = make_bundle(tmp_path / "good")
    r = _run(good, folder)
    assert r.exit_code == 0, r.output
    bad = make_bundle(tmp_path / "bad", baked={"pixel": PIXEL_THRESHOLD, "image": 0.5,
                                               "rule": {"toy": "brightness"}})
    line = _one_error_line(_run(bad, folder), 4)
    assert "model.onnx" in line and "thresholds.image 0.5" in line and f"{IMAGE_THRESHOLD}" in line


def test_evaluate_onnx_refuses_a_graph_whose_baked_thresholds_differ(tmp_path, tiny_dataset):
    pytest.importorskip("matplotlib")
    bad = make_bundle(tmp_path / "bad", baked={"pixel": 0.25, "image": IMAGE_THRESHOLD,
                                               "rule": {"toy": "brightness"}})
    r = CliRunner().invoke(main, ["evaluate", str(bad), str(tiny_dataset), "--backend", "onnx",
                                  "--out", str(tmp_path / "eval")])
    line = _one_error_line(r, 2)
    assert "model.onnx" in line and "thresholds.pixel 0.25" in line
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_export_refuses_graphs_with_other_thresholds_and_a_hand_edited_manifest(tmp_path):
    pytest.importorskip("onnx")
    bad = make_bundle(tmp_path / "bad", baked={"pixel": PIXEL_THRESHOLD, "image": 0.5,
                                               "rule": {"toy": "brightness"}})
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    line = _one_error_line(CliRunner().invoke(main, ["export", str(bad), "-p", "fp32"]), 2)
    assert "thresholds.image 0.5" in line
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before
    # Before: a manifest edited by hand was re-exported and its hashes recomputed.
    edited = make_bundle(tmp_path / "edited")
    _edit(edited, lambda m: m["thresholds"].update(image=0.1))
    before = {p.name: p.read_bytes() for p in edited.iterdir()}
    line = _one_error_line(CliRunner().invoke(main, ["export", str(edited), "-p", "fp32", "--force"]), 2)
    assert "thresholds.image differs from what training or `edgestad thresholds` recorded" in line
    assert {p.name: p.read_bytes() for p in edited.iterdir()} == before


# ------------------------------------------------------------------------------ edgestad thresholds


def test_thresholds_recomputes_from_stored_statistics_and_updates_every_graph(tmp_path):
    thresholds, pixels, scores = _validation_rule()
    bundle = make_bundle(tmp_path / "b", thresholds=thresholds, fp16=True, engine=True)
    old_files = load_bundle(bundle).files
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--pixel-fpr", "0.01",
                                  "--image-false-reject", "0.05", "--reason", "line 3 too strict"])
    assert r.exit_code == 0, r.output
    assert "removed model.fp16.test.engine" in r.output and "edgestad export" in r.output
    b = load_bundle(bundle)  # digest, hashes: all verify
    thr = b.thresholds
    assert thr["pixel"] == pytest.approx(np.quantile(pixels, 0.99))  # 0.01 is a stored point
    from statistics import NormalDist
    assert thr["image"] == pytest.approx(scores.mean() + NormalDist().inv_cdf(0.95) * scores.std(ddof=1))
    entry = b.manifest["thresholds_history"][-1]
    assert entry["old"] == {"pixel": thresholds["pixel"], "image": thresholds["image"]}
    assert entry["new"] == {"pixel": thr["pixel"], "image": thr["image"]}
    assert "--pixel-fpr 0.01" in entry["rule"] and "--image-false-reject 0.05" in entry["rule"]
    assert entry["by"] and entry["at"] and entry["reason"] == "line 3 too strict"
    # every graph carries the new thresholds; hashes refreshed; fp16 still points at its fp32
    fp32, fp16 = (bundle / "model.onnx").read_bytes(), (bundle / "model.fp16.onnx").read_bytes()
    for data in (fp32, fp16):
        assert json.loads(graph_meta.read_metadata(data)["thresholds"]) == thr
    import hashlib
    assert graph_meta.read_metadata(fp16)["source_fp32_sha256"] == hashlib.sha256(fp32).hexdigest()
    assert b.files["model.onnx"] != old_files["model.onnx"]
    assert b.manifest["exports"]["onnx_sha256"]["fp16"] == hashlib.sha256(fp16).hexdigest()
    assert not (bundle / "model.fp16.test.engine").exists()
    assert b.manifest["exports"]["engines"] == [] and "model.fp16.test.engine" not in b.files
    bundle_thresholds.check_graph_thresholds(b)
    # the graphs still run
    folder = write_folder(tmp_path / "frames", 2)
    assert _run(bundle, folder).exit_code == 0


def test_thresholds_at_the_trained_fpr_reproduce_the_trained_value(tmp_path):
    thresholds, _, _ = _validation_rule()
    value, _ = threshold_rules.pixel_threshold_for_fpr(thresholds, 0.001)
    assert value == thresholds["pixel"]
    between, text = threshold_rules.pixel_threshold_for_fpr(thresholds, 0.0123)
    assert "interpolated" in text
    table = thresholds["rule"]["validation_pixel_quantiles"]
    lo = max(i for i, f in enumerate(table["fpr"]) if f <= 0.0123)
    assert table["value"][lo + 1] <= between <= table["value"][lo]


def test_thresholds_set_show_and_bad_requests(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--image-threshold", "0.9"])
    assert r.exit_code == 0, r.output
    assert load_bundle(bundle).thresholds["image"] == 0.9
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--show"])
    assert r.exit_code == 0 and "image threshold 0.9" in r.output and "digest: matches" in r.output
    assert "model.onnx: thresholds match the manifest" in r.output and "history:" in r.output
    # the toy bundle stores no validation statistics: say which option cannot work
    line = _one_error_line(CliRunner().invoke(main, ["thresholds", str(bundle), "--pixel-fpr", "0.01"]), 2)
    assert line.startswith("error: --pixel-fpr: ")
    line = _one_error_line(CliRunner().invoke(main, ["thresholds", str(bundle)]), 2)
    assert "--show" in line
    line = _one_error_line(CliRunner().invoke(main, ["thresholds", str(bundle), "--pixel-fpr", "0.1",
                                                     "--pixel-threshold", "1"]), 2)
    assert "--pixel-fpr" in line


# ------------------------------------------------------------------------------ signing


def test_sign_and_run_with_a_trusted_key(tmp_path):
    keys = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keygen", "--out", str(keys)])
    assert r.exit_code == 0, r.output
    private, public = keys / "edgestad-signing.key", keys / "edgestad-signing.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert _one_error_line(CliRunner().invoke(main, ["keygen", "--out", str(keys)]), 2)

    folder = write_folder(tmp_path / "frames", 2)
    bundle = make_bundle(tmp_path / "b")
    line = _one_error_line(_run(bundle, folder, "--trusted-key", str(public)), 4)
    assert "unsigned" in line
    r = CliRunner().invoke(main, ["sign", str(bundle), "--key", str(private)])
    assert r.exit_code == 0, r.output
    assert _run(bundle, folder, "--trusted-key", str(public)).exit_code == 0
    # the trusted_key config key does the same
    config = tmp_path / "edgestad.toml"
    config.write_text('bundle = "b"\nfolder = "frames"\nmax_reconnects = 0\ntrusted_key = "keys/edgestad-signing.pub"\n')
    assert _run(bundle, folder, config=config).exit_code == 0

    # signed by another key
    other = tmp_path / "other"
    CliRunner().invoke(main, ["keygen", "--out", str(other)])
    line = _one_error_line(_run(bundle, folder, "--trusted-key", str(other / "edgestad-signing.pub")), 4)
    assert "not the trusted key" in line
    # a file added after signing (the bundle still verifies on its own)
    add_files(bundle, {"notes.txt": b"hello"})
    line = _one_error_line(_run(bundle, folder, "--trusted-key", str(public)), 4)
    assert "notes.txt is not covered by the signature" in line
    # re-signed, then the signature file itself altered
    CliRunner().invoke(main, ["sign", str(bundle), "--key", str(private)])
    assert _run(bundle, folder, "--trusted-key", str(public)).exit_code == 0
    doc = json.loads((bundle / "signature.json").read_text())
    doc["payload"]["decision_digest"] = "0" * 64
    (bundle / "signature.json").write_text(json.dumps(doc))
    line = _one_error_line(_run(bundle, folder, "--trusted-key", str(public)), 4)
    assert "does not verify" in line
    # a threshold change removes the now-stale signature and says so
    CliRunner().invoke(main, ["sign", str(bundle), "--key", str(private)])
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--image-threshold", "0.95"])
    assert r.exit_code == 0 and "removed signature.json" in r.output
    assert "unsigned" in _one_error_line(_run(bundle, folder, "--trusted-key", str(public)), 4)


def test_signature_survives_packing(tmp_path):
    from edgestad.bundle import pack_bundle
    keys = tmp_path / "keys"
    private, public = signing.keygen(keys)
    bundle = make_bundle(tmp_path / "b")
    signing.sign_bundle(bundle, private)
    archive = pack_bundle(bundle, tmp_path / "b.tar.gz")
    loaded = load_bundle(archive)
    assert signing.verify_signature(loaded, public)
    with pytest.raises(BundleError):
        signing.load_private_key(public)


# ------------------------------------------------------------------------------ the review band


def _rank_rule(n: int = 20) -> dict:
    """Thresholds as training writes them now (validation scores stored)."""
    thresholds, _, _ = _validation_rule()
    scores = sorted(float(v) for v in np.linspace(0.30, 0.60, n))
    thresholds["rule"].update(validation_scores=scores, validation_images=n)
    thresholds["image"] = scores[-1]
    return thresholds


def test_image_false_reject_uses_the_stored_scores_and_widens_what_n_cannot_support(tmp_path):
    bundle = make_bundle(tmp_path / "b", thresholds=_rank_rule(20))
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--image-false-reject", "0.2",
                                  "--review-false-reject", "0.45"])
    assert r.exit_code == 0, r.output
    thr = load_bundle(bundle).thresholds
    scores = thr["rule"]["validation_scores"]
    assert thr["image"] == scores[-4]             # k = floor(0.2 * 21) = 4
    assert thr["image_review"] == scores[-9]      # k = floor(0.45 * 21) = 9
    assert thr["rule"]["image_promised_false_reject"] == pytest.approx(4 / 21)
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--image-false-reject", "0.01"])
    assert r.exit_code == 0, r.output
    thr = load_bundle(bundle).thresholds
    assert thr["image"] == scores[-1] and thr["rule"]["image_target_widened"]
    assert "widened" in r.output
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--show"])
    assert "REVIEW above" in r.output and "promised good parts NG: 0.0476" in r.output


def test_review_band_reaches_graphs_events_and_can_be_removed(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    # toy score = brightest pixel: spot frames ~0.98, the others below 0.5
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--image-threshold", "0.99",
                                  "--review-threshold", "0.5", "--reason", "look at bright parts"])
    assert r.exit_code == 0, r.output
    b = load_bundle(bundle)
    assert b.thresholds["image_review"] == 0.5
    assert json.loads(graph_meta.read_metadata((bundle / "model.onnx").read_bytes())["thresholds"]) \
        == b.thresholds
    assert b.manifest["thresholds_history"][-1]["new"]["image_review"] == 0.5
    folder = write_folder(tmp_path / "frames", 6)          # frames 0 and 3 have the spot
    events = tmp_path / "events"
    result = _run(bundle, folder, "--events", str(events))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (events / "events.jsonl").read_text().splitlines()]
    parts = [e for e in lines if e["event"] in ("ok", "ng", "review")]
    assert [(e["frame"], e["event"], e["decision"]) for e in parts] == [
        (0, "review", "REVIEW"), (3, "review", "REVIEW")]
    start = next(e for e in lines if e["event"] == "start")
    assert start["review_threshold"] == 0.5
    stop = next(e for e in lines if e["event"] == "stop")
    assert stop["review_count"] == 2 and stop["ng_count"] == 0
    # a REVIEW threshold must lie below the NG one; --no-review removes the band
    line = _one_error_line(CliRunner().invoke(main, ["thresholds", str(bundle), "--review-threshold",
                                                     "0.995"]), 2)
    assert "--review-threshold" in line and load_bundle(bundle).thresholds["image_review"] == 0.5
    r = CliRunner().invoke(main, ["thresholds", str(bundle), "--no-review"])
    assert r.exit_code == 0, r.output
    assert load_bundle(bundle).thresholds["image_review"] is None      # ended (null)
    assert _run(bundle, folder).exit_code == 0
