"""Screenshots of the operator station for docs/operator/station.md, on a real trained bundle and real images.

    python scripts/station_screenshots.py BUNDLE DATA/<category> [--out docs/images]

Copies BUNDLE into a temporary folder (its thresholds are changed there, never in BUNDLE), adds a
REVIEW band (`edgestad thresholds --review-false-reject 0.25`), scores the category's test images
with the exported fp32 graph, and runs the real runtime pipeline + operator station on a camera
that shows a good part, a REVIEW part and a defective part in turn; headless Chromium (the tests'
WebDriver) takes the pictures: OK, NG, REVIEW, the gallery's part view, the threshold dialog.
Needs chromium and chromedriver (scripts/install_services.sh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", type=Path, help="an MVTec-layout category (its test/ images are shown)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args()

    from edgestad.bundle import load_bundle
    from edgestad.images import read_image
    from edgestad.runner import run_graph
    from edgestad.runtime.accounts import Users
    from edgestad.runtime.backends import select_backend
    from edgestad.runtime.cli import make_station
    from edgestad.runtime.config import RunConfig
    from edgestad.runtime.http import OverlayFeed, RuntimeHttpServer
    from edgestad.runtime.pipeline import Pipeline
    from edgestad.runtime.preprocess import InputSpec, Preprocessor
    from edgestad.runtime.results import Thresholds
    from edgestad.runtime.sinks import EventLog, NgSaver
    from edgestad.runtime.sources import Frame, Source, SourceSpec
    from edgestad.bundle_thresholds import change_thresholds
    from helpers import WebDriver, wait_for

    work = Path(tempfile.mkdtemp(prefix="edgestad-shots-"))
    bundle_dir = work / "bundle"
    shutil.copytree(args.bundle, bundle_dir, ignore=shutil.ignore_patterns("*.engine"))
    change_thresholds(bundle_dir, review_false_reject=0.25, reason="screenshots", log=lambda s: None)
    bundle = load_bundle(bundle_dir)
    thr = Thresholds.from_manifest(bundle.manifest)
    h, w = bundle.input_size

    # choose a good, a REVIEW and a defective part by their real scores
    paths = sorted((args.data / "test").glob("*/*.png"))
    batch = np.stack([read_image(p, (h, w)).transpose(2, 0, 1) for p in paths])
    _, scores = run_graph(bundle.file(bundle.manifest["exports"]["onnx"]["fp32"]), batch)
    pick = {}
    for decision, test in (("ok", lambda s: s <= thr.review), ("review", lambda s: thr.review < s <= thr.image),
                           ("ng", lambda s: s > thr.image)):
        found = [(p, s) for p, s in zip(paths, scores) if test(s) and (decision != "ok" or "good" in p.parts)]
        if not found:
            sys.exit(f"no {decision} image among {len(paths)} test images at thresholds {thr}")
        pick[decision] = found[len(found) // 2][0]
    print({k: str(v) for k, v in pick.items()})

    import cv2

    plan = {"mode": "ok"}

    class Camera(Source):
        live = True
        description = f"camera ({args.data.name} test images)"

        def __init__(self):
            self.i = 0

        def open(self):
            pass

        def read(self):
            time.sleep(0.2)
            self.i += 1
            return Frame(cv2.imread(str(pick[plan["mode"]])), self.i, time.time(), time.monotonic())

    users = Users(work / "users.json")
    users.add("lea", "lead", "lead-password-1")
    users.save()
    cfg = RunConfig(bundle=str(bundle_dir), http="127.0.0.1:0", events=str(work / "events"), events_all=True,
                    save_ng=str(work / "ng"), captures=str(work / "captures"), users=str(work / "users.json"),
                    shifts="06:00,14:00,22:00")
    backend = select_backend(bundle.path, bundle.manifest, "onnxruntime", "fp32")
    pipe = None
    station = make_station(cfg, bundle, backend, thr, lambda: pipe)
    feed = OverlayFeed(thr, max_fps=10)
    sinks = [station.sink, EventLog(work / "events", all_frames=True), NgSaver(work / "ng", thr), feed]
    pipe = Pipeline(SourceSpec("camera", "0"), backend, Preprocessor(InputSpec.from_manifest(bundle.manifest)),
                    thr, sinks, source_factory=Camera,
                    model_info={"bundle": bundle_dir.name, "method": bundle.manifest.get("method")})
    server = RuntimeHttpServer("127.0.0.1", 0, pipe.snapshot, feed, station=station).start()
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    args.out.mkdir(parents=True, exist_ok=True)
    driver = WebDriver(work, window="1280,720")
    lamp = "return document.getElementById('lamp').dataset.decision;"

    def shot(name):
        time.sleep(1.5)   # let the stream and charts catch up
        png = cv2.imdecode(np.frombuffer(driver.screenshot(), np.uint8), cv2.IMREAD_COLOR)
        small = cv2.resize(png, (960, png.shape[0] * 960 // png.shape[1]), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(args.out / f"{name}.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        print("wrote", args.out / f"{name}.png")

    try:
        driver.get(server.url + "/")
        for mode in ("ok", "ng", "ok", "review", "ng", "ok", "review", "ok"):
            plan["mode"] = mode
            assert wait_for(lambda: driver.js(lamp) == mode.upper(), 20), mode
            time.sleep(2.0)
        for mode in ("ok", "ng", "review"):
            plan["mode"] = mode
            assert wait_for(lambda: driver.js(lamp) == mode.upper(), 20), mode
            shot(f"station_{mode}")
        plan["mode"] = "ok"
        driver.js("document.querySelector('#gallery .thumb').click(); return 1;")
        assert wait_for(lambda: driver.js("return document.getElementById('partMap').naturalWidth > 0;"), 20)
        shot("station_gallery_part")
        driver.js("document.getElementById('partDialog').close(); return 1;")
        driver.js("""document.getElementById('loginBtn').click();
            document.getElementById('loginUser').value = 'lea';
            document.getElementById('loginPassword').value = 'lead-password-1';
            document.getElementById('loginSubmit').click(); return 1;""")
        assert wait_for(lambda: driver.js("return !document.getElementById('leadTools').hidden;"), 20)
        driver.js("document.getElementById('thresholdBtn').click(); return 1;")
        assert wait_for(lambda: driver.js("return document.getElementById('thrHistory').children.length > 0;"), 20)
        shot("station_thresholds")
    finally:
        driver.quit()
        pipe.stop()
        runner.join(20)
        server.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
