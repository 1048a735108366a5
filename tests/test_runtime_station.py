"""The operator station: the page at ``/`` in real headless Chromium against a running pipeline
(real ONNX Runtime session, real files, real sockets), its accounts, its threshold changes
through the bundle's recorded path, captures, and counters that equal the events log.

With ``EDGESTAD_SCREENSHOTS=DIR`` the page test writes its screenshots there (docs/operator/station.md's come
from ``scripts/station_screenshots.py`` on a real trained bundle, with the same driver)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgestad.bundle import load_bundle
from edgestad.runtime.accounts import Users
from edgestad.runtime.backends import select_backend
from edgestad.runtime.config import RunConfig
from edgestad.runtime.http import OverlayFeed, RuntimeHttpServer
from edgestad.runtime.pipeline import Pipeline
from edgestad.runtime.preprocess import InputSpec, Preprocessor
from edgestad.runtime.results import Thresholds
from edgestad.runtime.sinks import EventLog, NgSaver
from edgestad.runtime.sources import SourceSpec
from edgestad.runtime.station import Counts, parse_shifts, shift_start
from helpers import CHROMEDRIVER, CHROMIUM, CHROMIUM_MISSING, PacedCamera, WebDriver, wait_for
from test_runtime_toy import frame_with_spot, make_toy_bundle, write_folder

LEAD, LEAD_PW = "lea", "lead-password-1"
VIEWER, VIEWER_PW = "vic", "viewer-password-1"
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=CHROMIUM_MISSING)


def line_camera(plan) -> PacedCamera:
    """A live camera at ~50 fps whose parts are good, NG (bright spot) or REVIEW (dimmer spot),
    as the test says (``plan["mode"]``)."""
    def part(i):
        img = frame_with_spot(i, spot=plan["mode"] != "good")
        if plan["mode"] == "review":   # toy score = brightest channel mean: 0.75 is inside (0.6, 0.8]
            img[img >= 250] = 191
        return img
    return PacedCamera(part, 0.02, "line camera")


class Station:
    """A running pipeline with the operator station, as `edgestad run --http` builds it."""

    def __init__(self, root: Path, source_factory=None, folder: Path | None = None, shifts=None):
        from edgestad.runtime.cli import make_station

        self.root = root
        self.bundle_dir = make_toy_bundle(root / "bundle", 48, 64)
        users = Users(root / "users.json")
        users.add(LEAD, "lead", LEAD_PW)
        users.add(VIEWER, "viewer", VIEWER_PW)
        users.save()
        self.plan = {"mode": "good"}
        self.cfg = RunConfig(bundle=str(self.bundle_dir), http="127.0.0.1:0", events=str(root / "events"),
                             events_all=True, save_ng=str(root / "ng"), captures=str(root / "captures"),
                             users=str(root / "users.json"), shifts=shifts)
        bundle = load_bundle(self.bundle_dir)
        backend = select_backend(bundle.path, bundle.manifest, "onnxruntime")
        thr = Thresholds.from_manifest(bundle.manifest)
        self.pipe = None
        self.station = make_station(self.cfg, bundle, backend, thr, lambda: self.pipe)
        self.feed = OverlayFeed(thr, max_fps=20)
        self.events = EventLog(root / "events", all_frames=True)
        sinks = [self.station.sink, self.events, NgSaver(root / "ng", thr), self.feed]
        spec = SourceSpec("folder", str(folder)) if folder else SourceSpec("camera", "7")
        self.pipe = Pipeline(spec, backend, Preprocessor(InputSpec.from_manifest(bundle.manifest)), thr, sinks,
                             source_factory=None if folder else (source_factory or (lambda: line_camera(self.plan))))
        self.server = RuntimeHttpServer("127.0.0.1", 0, self.pipe.snapshot, self.feed,
                                        station=self.station).start()
        self.thread = threading.Thread(target=self.pipe.run, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return self.server.url

    def stop(self):
        self.pipe.stop()
        self.thread.join(20)

    def close(self):
        self.stop()
        self.server.close()


def call(url, path, body=None, cookie=None, csrf=None, method=None):
    """(status, json) of one request; errors are answers too."""
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    if csrf:
        headers["X-CSRF-Token"] = csrf
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), exc.headers


def login(url, user, password):
    status, body, headers = call(url, "/api/login", {"user": user, "password": password})
    assert status == 200, body
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    return cookie, body["csrf"]


@pytest.fixture
def station(tmp_path):
    st = Station(tmp_path)
    assert wait_for(lambda: st.pipe.frames_processed > 5, 20)
    yield st
    st.close()


# --------------------------------------------------------------------------- in the browser


PAGE_STATE = """const q = (id) => document.getElementById(id);
const img = q('stream');
return {lamp: q('lamp').dataset.decision, score: q('lampScore').textContent, run: q('runstate').textContent,
        w: img.naturalWidth, total: q('a_total').textContent, ok: q('a_ok').textContent,
        ng: q('a_ng').textContent, review: q('a_review').textContent, shift_total: q('s_total').textContent,
        thumbs: Array.from(document.querySelectorAll('#gallery .thumb')).map(t => t.dataset.stem),
        health: q('health').textContent, who: q('who').textContent,
        lead: !q('leadTools').hidden};"""


def shots(driver, name):
    folder = os.environ.get("EDGESTAD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(driver.screenshot())


@needs_chromium
def test_page_lamp_gallery_and_a_leads_threshold_change(station, tmp_path):
    driver = WebDriver(tmp_path)
    try:
        driver.get(station.url + "/")
        assert wait_for(lambda: driver.js(PAGE_STATE)["lamp"] == "OK" and driver.js(PAGE_STATE)["w"] > 0, 20)
        assert wait_for(lambda: "uninformed_students" in driver.js(PAGE_STATE)["health"], 10)
        assert driver.js(PAGE_STATE)["run"] == "running"
        shots(driver, "station_ok")

        # an NG part: the lamp turns NG within one second of the frame's result
        station.plan["mode"] = "ng"
        assert wait_for(lambda: station.pipe.ng_count > 0, 10)
        t_ng = time.monotonic()
        assert wait_for(lambda: driver.js(PAGE_STATE)["lamp"] == "NG", 5)
        assert time.monotonic() - t_ng < 1.0, "the lamp took longer than a second to turn NG"
        assert wait_for(lambda: station.pipe.ng_count >= 4, 10)
        station.plan["mode"] = "good"
        shots(driver, "station_ng")
        # the gallery shows the newest NG parts of the NG store, newest first
        assert wait_for(lambda: len(list((station.root / "ng").glob("*.json"))) >= 3, 10)
        store = sorted((p.stem for p in (station.root / "ng").glob("*.json")), reverse=True)
        assert wait_for(lambda: driver.js(PAGE_STATE)["thumbs"][:3] == sorted(
            (p.stem for p in (station.root / "ng").glob("*.json")), reverse=True)[:3], 10), store
        driver.js("document.querySelector('#gallery .thumb').click(); return 1;")
        assert wait_for(lambda: driver.js("return document.getElementById('partDialog').open && "
                                          "document.getElementById('partMap').naturalWidth > 0;"), 10)
        shots(driver, "station_gallery_part")
        driver.js("document.getElementById('partDialog').close(); return 1;")

        # a wrong password is refused on the page; the lead logs in
        driver.js(f"""document.getElementById('loginBtn').click();
            document.getElementById('loginUser').value = '{LEAD}';
            document.getElementById('loginPassword').value = 'wrong-password';
            document.getElementById('loginSubmit').click(); return 1;""")
        assert wait_for(lambda: "wrong password" in driver.js(
            "return document.getElementById('loginError').textContent;"), 10)
        driver.js(f"""document.getElementById('loginPassword').value = '{LEAD_PW}';
            document.getElementById('loginSubmit').click(); return 1;""")
        assert wait_for(lambda: driver.js(PAGE_STATE)["lead"], 10)

        # the lead adds a REVIEW band and lowers nothing else, from the threshold dialog
        driver.js("document.getElementById('thresholdBtn').click(); return 1;")
        assert wait_for(lambda: driver.js("return document.getElementById('thresholdDialog').open;"), 10)
        # clicking the histogram moves the NG line to the score under the pointer
        assert wait_for(lambda: driver.js("return S.scores !== null && S.scores.count > 0;"), 10)
        original, clicked, lo, hi = driver.js("""const c = document.getElementById('thrHist');
            const before = document.getElementById('thrImage').value; const r = c.getBoundingClientRect();
            c.dispatchEvent(new MouseEvent('click', {clientX: r.left + r.width / 2, clientY: r.top + 10, bubbles: true}));
            const e = S.scores.histogram.edges;
            return [before, parseFloat(document.getElementById('thrImage').value), e[0], e[e.length - 1]];""")
        assert clicked == pytest.approx((lo + hi) / 2, abs=2 * (hi - lo) / 520)   # within 2 canvas pixels
        driver.js(f"document.getElementById('thrImage').value = '{original}'; return 1;")
        driver.js("""document.getElementById('thrReviewOn').checked = true;
            document.getElementById('thrReview').value = '0.6';
            document.getElementById('thrReason').value = 'dim spots need a look';
            document.getElementById('thrReview').dispatchEvent(new Event('input')); return 1;""")
        shots(driver, "station_thresholds")
        driver.js("document.getElementById('thrApply').click(); return 1;")
        assert wait_for(lambda: station.pipe.thresholds.review == pytest.approx(0.6), 10)
        driver.js("document.getElementById('thresholdDialog').close(); return 1;")
        station.plan["mode"] = "review"
        assert wait_for(lambda: driver.js(PAGE_STATE)["lamp"] == "REVIEW", 10)
        shots(driver, "station_review")
        station.plan["mode"] = "good"
    finally:
        driver.quit()
    # recorded in the bundle's change log, by the lead, through the page; the digest still verifies
    bundle = load_bundle(station.bundle_dir)   # verifies files and the decision digest
    last = bundle.manifest["thresholds_history"][-1]
    assert last["by"] == f"{LEAD} (operator page)" and last["reason"] == "dim spots need a look"
    assert last["new"]["image_review"] == pytest.approx(0.6) and "image_review" not in last["old"]
    assert bundle.manifest["thresholds"]["image_review"] == pytest.approx(0.6)
    assert station.pipe.review_count > 0


def shifts_away_from_now(hours=(4, 12, 20)) -> str:
    """Three shift start times (local, HH:MM) these many hours from now, so that no shift changes
    while a test runs (fixed times made the shift counter restart when CI ran across 06:00)."""
    import datetime
    now = datetime.datetime.now()
    return ",".join((now + datetime.timedelta(hours=h)).strftime("%H:%M") for h in hours)


@needs_chromium
def test_counters_on_the_page_equal_the_events_log_after_1000_frames(tmp_path):
    folder = write_folder(tmp_path / "frames", 1000, spot_every=7)
    st = Station(tmp_path / "run", folder=folder, shifts=shifts_away_from_now())
    driver = None
    try:
        st.thread.join(120)
        assert not st.thread.is_alive() and st.pipe.frames_processed == 1000
        driver = WebDriver(tmp_path)
        driver.get(st.url + "/")
        assert wait_for(lambda: driver.js(PAGE_STATE)["total"] == "1000", 20)
        page = driver.js(PAGE_STATE)
    finally:
        if driver is not None:
            driver.quit()
        st.server.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "events" / "events.jsonl").read_text().splitlines()]
    decided = [e for e in events if e["event"] in ("ok", "ng", "review")]
    assert len(decided) == 1000
    for key in ("ok", "ng", "review"):
        assert int(page[key]) == sum(e["event"] == key for e in decided), key
    assert int(page["ng"]) == 1000 // 7 + 1        # every 7th frame has the spot
    assert page["shift_total"] == "1000"
    stop = [e for e in events if e["event"] == "stop"][-1]
    assert stop["counts"]["all"] == {"total": 1000, "ok": int(page["ok"]), "review": 0, "ng": int(page["ng"])}


# --------------------------------------------------------------------------- accounts and bad input


def test_unauthenticated_viewer_and_csrf_less_changes_are_refused(station):
    url = station.url
    before = load_bundle(station.bundle_dir).manifest["thresholds"]
    assert call(url, "/api/thresholds", {"image": 0.5})[0] == 401
    assert call(url, "/api/capture", {"frame": 1, "label": "good"})[0] == 401
    cookie, csrf = login(url, VIEWER, VIEWER_PW)
    status, body, _ = call(url, "/api/thresholds", {"image": 0.5}, cookie, csrf)
    assert status == 403 and "viewer" in body["error"]
    cookie, csrf = login(url, LEAD, LEAD_PW)
    assert call(url, "/api/thresholds", {"image": 0.5}, cookie)[0] == 403            # no CSRF token
    assert call(url, "/api/thresholds", {"image": 0.5}, cookie, "forged")[0] == 403  # wrong token
    assert load_bundle(station.bundle_dir).manifest["thresholds"] == before
    assert station.pipe.thresholds.image == pytest.approx(before["image"])


def test_wrong_password_unknown_user_and_the_login_rate_limit(station):
    url = station.url
    status, body, _ = call(url, "/api/login", {"user": LEAD, "password": "nope-nope"})
    assert status == 401 and body["error"] == "unknown user or wrong password"
    status, body, _ = call(url, "/api/login", {"user": "mallory", "password": "whatever1"})
    assert status == 401 and body["error"] == "unknown user or wrong password"   # same answer
    for _ in range(4):
        call(url, "/api/login", {"user": LEAD, "password": "nope-nope"})
    status, body, headers = call(url, "/api/login", {"user": LEAD, "password": LEAD_PW})
    assert status == 429 and int(headers["Retry-After"]) > 0   # even the right password waits
    assert call(url, "/api/login", b"{not json")[0] == 400


def test_threshold_changes_bad_values_revert_and_signature(station, tmp_path):
    from edgestad.signing import keygen, sign_bundle

    priv, _ = keygen(tmp_path / "keys")
    sign_bundle(station.bundle_dir, priv)
    station.station.model["signature"] = "verified with the trusted key"
    url = station.url
    cookie, csrf = login(url, LEAD, LEAD_PW)
    manifest = lambda: load_bundle(station.bundle_dir).manifest  # noqa: E731
    before = manifest()["thresholds"]
    for bad in ({"image": "high"}, {"image": float("1e9")}, {"image": 0.5, "review": 0.7},
                {"image": None}, {"image": 0.5, "reason": "x" * 400}):
        status, body, _ = call(url, "/api/thresholds", bad, cookie, csrf)
        assert status == 400 and body["error"], bad
    assert call(url, "/api/thresholds", b"[1, 2]", cookie, csrf)[0] == 400
    assert manifest()["thresholds"] == before and "thresholds_history" not in manifest()

    status, body, _ = call(url, "/api/thresholds", {"image": 0.7, "review": None, "reason": "tighter"}, cookie, csrf)
    assert status == 200, body
    assert station.pipe.thresholds.image == pytest.approx(0.7)   # the next frame uses it
    assert "no longer covers" in body["signature"]
    assert not (station.bundle_dir / "signature.json").exists()
    entry = manifest()["thresholds_history"][-1]
    assert entry["old"]["image"] == pytest.approx(before["image"]) and entry["new"]["image"] == pytest.approx(0.7)
    status, body, _ = call(url, "/api/thresholds/revert", {}, cookie, csrf)
    assert status == 200 and body["thresholds"]["image"] == pytest.approx(before["image"])
    assert station.pipe.thresholds.image == pytest.approx(before["image"])
    assert manifest()["thresholds_history"][-1]["reason"].startswith("revert of the change of")
    load_bundle(station.bundle_dir)   # digest verifies after both changes


def test_capture_writes_the_mvtec_layout_and_refuses_a_folder_it_cannot_write(station):
    from edgestad.datasets import load_test_set

    url = station.url
    cookie, csrf = login(url, LEAD, LEAD_PW)
    frame = station.station.frames.latest().index
    status, good, _ = call(url, "/api/capture", {"frame": frame, "label": "good"}, cookie, csrf)
    assert status == 200, good
    station.plan["mode"] = "ng"
    assert wait_for(lambda: any((station.root / "ng").glob("*.json")), 10)
    stem = sorted(p.stem for p in (station.root / "ng").glob("*.json"))[-1]
    status, bad, _ = call(url, "/api/capture", {"stem": stem, "label": "spot"}, cookie, csrf)
    assert status == 200, bad
    cap = station.root / "captures"
    assert Path(good["image"]).parent == cap / "train" / "good"
    assert Path(bad["image"]).parent == cap / "test" / "spot"
    sidecar = json.loads(Path(bad["image"]).with_suffix(".json").read_text())
    assert sidecar["by"] == f"{LEAD} (operator page)" and sidecar["label"] == "spot"
    # the next `edgestad evaluate` can read it: MVTec layout with its (empty) mask
    (cap / "test" / "good").mkdir()
    shutil.copy(good["image"], cap / "test" / "good" / "g.png")
    images, masks, labels, *_ = load_test_set(cap, (48, 64))
    assert sorted(labels.tolist()) == [0, 1]
    for bad_body in ({"frame": frame, "label": "Bad Label"}, {"frame": 10**9, "label": "good"},
                     {"stem": "../../etc/passwd", "label": "good"}, {"label": "good"}):
        assert call(url, "/api/capture", bad_body, cookie, csrf)[0] in (400, 404), bad_body
    # a capture folder that cannot be written: one clear answer, nothing written
    blocker = station.root / "not-a-folder"
    blocker.write_text("a file")
    station.station.captures = blocker / "captures"
    status, body, _ = call(url, "/api/capture", {"frame": station.station.frames.latest().index,
                                                 "label": "good"}, cookie, csrf)
    assert status == 500 and "not writable" in body["error"] and str(blocker) in body["error"]


def test_viewing_needs_a_login_off_loopback(tmp_path):
    srv = RuntimeHttpServer("0.0.0.0", 0, lambda: {}, OverlayFeed(Thresholds(0.5, 0.5)))
    try:
        assert srv.view_requires_login
    finally:
        srv.close()
    loop = RuntimeHttpServer("127.0.0.1", 0, lambda: {}, OverlayFeed(Thresholds(0.5, 0.5)))
    assert not loop.view_requires_login
    loop.close()


# --------------------------------------------------------------------------- counters


def test_counts_survive_a_restart_through_the_events_log(tmp_path):
    counts = Counts()
    events = EventLog(tmp_path)
    for d in ["ok"] * 5 + ["ng"] * 2 + ["review"]:
        events.write({"event": d, "counts": counts.add(d)})
    events.close()
    again = Counts()
    assert again.restore_from_events(tmp_path)
    assert again.state()["all"] == {"total": 8, "ok": 5, "review": 1, "ng": 2}
    again.add("ok")
    assert again.state()["all"]["total"] == 9
    # a torn last line (power cut) is skipped, the line before it counts
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"event": "ok", "counts": {"all": {"tot')
    third = Counts()
    assert third.restore_from_events(tmp_path) and third.state()["all"]["total"] == 8


def test_shifts(tmp_path):
    assert parse_shifts("22:00, 06:00,14:00") == ((6, 0), (14, 0), (22, 0))
    from edgestad.runtime.errors import ConfigError
    for bad in ("6", "25:00", "06:00,06:00", "06:61"):
        with pytest.raises(ConfigError, match="shift"):
            parse_shifts(bad)
    import datetime as dt
    day = dt.datetime(2026, 12, 5, 3, 0).astimezone()
    shifts = parse_shifts("06:00,14:00,22:00")
    assert dt.datetime.fromtimestamp(shift_start(shifts, day.timestamp())).hour == 22   # yesterday's night shift
    assert dt.datetime.fromtimestamp(shift_start(shifts, day.replace(hour=15).timestamp())).hour == 14
    clock = [day.replace(hour=13, minute=59).timestamp()]
    counts = Counts(shifts, clock=lambda: clock[0])
    counts.add("ok")
    counts.add("ng")
    clock[0] = day.replace(hour=14, minute=1).timestamp()
    counts.add("ok")
    s = counts.state()
    assert s["all"]["total"] == 3 and s["shift"] == {"total": 1, "ok": 1, "review": 0, "ng": 0}


def test_users_file_is_private_and_checked(tmp_path):
    from edgestad.runtime.errors import ConfigError

    users = Users(tmp_path / "users.json")
    users.add("ann", "lead", "long-enough-1")
    users.save()
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "users.json").read_text()
    assert "long-enough-1" not in text and "scrypt$" in text
    loaded = Users.load(tmp_path / "users.json")
    assert loaded.check("ann", "long-enough-1") == "lead" and loaded.check("ann", "wrong") is None
    os.chmod(tmp_path / "users.json", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Users.load(tmp_path / "users.json")
    with pytest.raises(ConfigError, match="at least 8"):
        users.add("bob", "lead", "short")
    with pytest.raises(ConfigError, match="exists"):
        users.add("ann", "viewer", "long-enough-2")


def test_users_cli(tmp_path):
    from click.testing import CliRunner

    from edgestad.cli import main

    f = tmp_path / "etc" / "users.json"
    r = CliRunner().invoke(main, ["users", "add", "lee", "--role", "lead", "--password-stdin", "--file", str(f)],
                           input="a-good-password\n")
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["users", "list", "--file", str(f)])
    assert r.exit_code == 0 and "lee\tlead" in r.output
    r = CliRunner().invoke(main, ["users", "add", "lee", "--role", "boss", "--password-stdin", "--file", str(f)],
                           input="a-good-password\n")
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["users", "remove", "nobody", "--file", str(f)])
    assert r.exit_code == 2 and "nobody" in r.output


def test_scores_summary_histogram_and_trend(station):
    status, body, _ = call(station.url, "/api/scores?minutes=5")
    assert status == 200 and body["count"] > 0
    hist = body["histogram"]
    assert sum(hist["ok"]) + sum(hist["ng"]) + sum(hist["review"]) == body["count"]
    assert hist["edges"][0] <= body["thresholds"]["image"] <= hist["edges"][-1]
    assert call(station.url, "/api/scores?minutes=abc")[0] == 400
    status, health, _ = call(station.url, "/api/health")
    assert status == 200 and health["model"]["method"] == "uninformed_students"
    assert health["memory"]["total_mib"] > 0


def test_thermal_zones_are_read_from_sysfs(tmp_path):
    from edgestad.runtime.station import thermal_zones

    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "temp").write_text("48500\n")
    (zone / "type").write_text("CPU-therm\n")
    (tmp_path / "thermal_zone1").mkdir()   # unreadable zone: skipped
    assert thermal_zones(tmp_path) == [{"zone": "thermal_zone0", "type": "CPU-therm", "celsius": 48.5}]


def test_frames_held_for_capture_are_bounded(station):
    assert wait_for(lambda: len(station.station.frames._items) == station.station.frames.size, 10)
    assert np.isfinite(station.station.frames.latest().score)
