"""The operator station's state: shift counters, recent scores, the NG gallery, health.

Everything the page at ``/`` shows that is not the live frame itself lives here, torch-free and
independent of the HTTP server (which only reads it):

- ``Counts``: total / OK / NG / REVIEW since the counters started and for the current shift
  (shift start times such as ``06:00, 14:00, 22:00``, local time). The ``StationSink`` counts
  each result in the output thread *before* the events log writes it and stamps the counts into
  the event (``"counts"``), so the events log is the persistence: on a restart the counts are
  read back from its last line (``Counts.restore_from_events``), and they equal the log exactly
  (with ``--events-all``; with NG-only events, OK parts after the last logged event of a crashed
  run are not in the log either, while a clean stop writes its counts in the ``stop`` event).
- ``RecentScores``: (time, score, decision) of the last minutes, for the trend and the histogram.
- ``RecentFrames``: the last few results with their frames, so that "save this frame" on the
  page can write the frame the lead is looking at.
- ``Gallery``: the newest NG/REVIEW sets of the bounded NG store (``--save-ng``).
- ``health()``: temperatures (``/sys/class/thermal``), memory, load, the model's identity.
"""

from __future__ import annotations

import bisect
import collections
import datetime as _dt
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError
from .results import FrameResult
from .sinks import Sink

log = logging.getLogger("edgestad.runtime.station")

DECISIONS = ("ok", "review", "ng")


# --------------------------------------------------------------------------- shifts and counts


def parse_shifts(text: str | Sequence[str] | None, key: str = "shifts") -> tuple[tuple[int, int], ...]:
    """``"06:00,14:00,22:00"`` (or a list) -> ((6, 0), (14, 0), (22, 0)), sorted; () for none."""
    if text is None or text == "" or text == []:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(item))
        if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
            raise ConfigError(f"{key}: expected shift start times as HH:MM, e.g. 06:00,14:00,22:00; "
                              f"got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: a shift start time is given twice ({text!r})")
    return tuple(sorted(out))


def shift_start(shifts: Sequence[tuple[int, int]], now: float | None = None) -> float | None:
    """Wall-clock start (s) of the shift containing ``now`` (local time); None without shifts."""
    if not shifts:
        return None
    t = _dt.datetime.fromtimestamp(time.time() if now is None else now).astimezone()
    today = [t.replace(hour=h, minute=m, second=0, microsecond=0) for h, m in shifts]
    earlier = [s for s in today if s <= t]
    if earlier:
        return earlier[-1].timestamp()
    h, m = shifts[-1]   # before the first shift of the day: the last shift of yesterday
    return (t.replace(hour=h, minute=m, second=0, microsecond=0) - _dt.timedelta(days=1)).timestamp()


def _zero() -> dict:
    return {"total": 0, "ok": 0, "review": 0, "ng": 0}


class Counts:
    """Counters since they started (``all``) and for the current shift (``shift``). Thread-safe."""

    def __init__(self, shifts: Sequence[tuple[int, int]] = (), clock=time.time):
        self.shifts = tuple(shifts)
        self.clock = clock
        self._lock = threading.Lock()
        self.all = _zero()
        self.shift = _zero()
        self.since = clock()
        self.shift_since = shift_start(self.shifts, self.since)
        self.restored_from: str | None = None

    def _roll(self, now: float) -> None:
        start = shift_start(self.shifts, now)
        if start != self.shift_since:
            self.shift_since = start
            self.shift = _zero()

    def add(self, decision: str, now: float | None = None) -> dict:
        """Count one part; returns the counts after it (what the event records)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        now = self.clock() if now is None else now
        with self._lock:
            self._roll(now)
            for c in (self.all, self.shift):
                c["total"] += 1
                c[decision] += 1
            return self._state()

    def _state(self) -> dict:
        return {"all": dict(self.all), "since": self.since, "shift": dict(self.shift),
                "shift_since": self.shift_since}

    def state(self) -> dict:
        with self._lock:
            self._roll(self.clock())
            return self._state()

    def snapshot(self) -> dict:
        """state() with yield (OK share) and ISO times, as the page shows it."""
        s = self.state()
        for key in ("all", "shift"):
            c = s[key]
            c["yield"] = round(c["ok"] / c["total"], 6) if c["total"] else None
        s["since_iso"] = _iso(s["since"])
        s["shift_since_iso"] = _iso(s["shift_since"]) if s["shift_since"] is not None else None
        s["persisted_in"] = self.restored_from
        return s

    def restore(self, state: dict, origin: str) -> None:
        """Continue from a recorded state (an event's ``counts``); the shift counts only when the
        recorded shift is the current one."""
        with self._lock:
            try:
                self.all = {k: int(state["all"][k]) for k in _zero()}
                self.since = float(state.get("since", self.since))
                if state.get("shift_since") == self.shift_since and self.shift_since is not None:
                    self.shift = {k: int(state["shift"][k]) for k in _zero()}
            except (KeyError, TypeError, ValueError):
                return   # a record without usable counts: start from zero
            self.restored_from = origin

    def restore_from_events(self, folder: str | os.PathLike) -> bool:
        """Read the counts back from the newest event that has them (events.jsonl, then the
        rotated files, newest first). True when found."""
        folder = Path(folder)
        files = [folder / "events.jsonl"] + sorted(folder.glob("events.*.jsonl"),
                                                   key=lambda p: _rotation_index(p))
        for path in files:
            record = _last_record_with(path, "counts")
            if record is not None:
                self.restore(record["counts"], f"{path} ({record.get('time', '?')})")
                return True
        return False


def _rotation_index(path: Path) -> int:
    m = re.fullmatch(r"events\.(\d+)\.jsonl", path.name)
    return int(m.group(1)) if m else 0


def _last_record_with(path: Path, key: str, chunk: int = 1 << 16) -> dict | None:
    """The last JSON line of ``path`` that has ``key`` (reads the file backwards in chunks)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            pos = f.tell()
            tail = b""
            while pos > 0:
                step = min(chunk, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                lines = tail.split(b"\n")
                tail = lines[0]   # maybe incomplete: keep it for the next chunk
                for line in reversed(lines[1:]):
                    record = _json_line(line, key)
                    if record is not None:
                        return record
            return _json_line(tail, key)
    except OSError:
        return None


def _json_line(line: bytes, key: str) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None   # a line torn by a power cut
    return record if isinstance(record, dict) and key in record else None


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- recent scores / frames


class RecentScores:
    """(wall time, score, decision) of recent parts, bounded by age and count. Thread-safe."""

    def __init__(self, minutes: float = 30.0, max_items: int = 50_000):
        self.max_age_s = float(minutes) * 60
        self._items: collections.deque = collections.deque(maxlen=int(max_items))
        self._lock = threading.Lock()

    def add(self, t: float, score: float, decision: str) -> None:
        with self._lock:
            self._items.append((t, float(score), decision))

    def window(self, minutes: float, now: float | None = None) -> list[tuple[float, float, str]]:
        now = time.time() if now is None else now
        start = now - min(float(minutes) * 60, self.max_age_s)
        with self._lock:
            items = list(self._items)
        times = [i[0] for i in items]
        return items[bisect.bisect_left(times, start):]

    def summary(self, minutes: float, thresholds: dict, bins: int = 40, max_points: int = 1500,
                now: float | None = None) -> dict:
        """Trend points (decimated to ``max_points`` keeping every flagged part) and a histogram
        whose range covers the scores and the thresholds."""
        window = self.window(minutes, now)   # once: the trend and the histogram see the same parts
        scores = np.array([s for _, s, _ in window], np.float64)
        decisions = np.array([d for _, _, d in window])
        points = window
        if len(window) > max_points:
            keep = np.zeros(len(window), bool)
            keep[np.linspace(0, len(window) - 1, max_points).astype(int)] = True
            keep |= decisions != "ok"
            points = [it for it, k in zip(window, keep) if k]
        marks = [v for v in (thresholds.get("image"), thresholds.get("review")) if v is not None]
        hist: dict[str, Any] = {"edges": [], "ok": [], "review": [], "ng": []}
        if len(scores):
            lo = float(min(scores.min(), *marks)) if marks else float(scores.min())
            hi = float(max(scores.max(), *marks)) if marks else float(scores.max())
            if hi <= lo:
                hi = lo + 1.0
            pad = 0.05 * (hi - lo)
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
            hist["edges"] = [round(float(e), 6) for e in edges]
            for d in DECISIONS:
                hist[d] = np.histogram(scores[decisions == d], edges)[0].astype(int).tolist()
        return {"minutes": minutes, "count": int(len(scores)),
                "points": [[round(t, 3), round(s, 6), d] for t, s, d in points],
                "histogram": hist, "thresholds": thresholds}


class RecentFrames:
    """The last ``size`` results (frame and map kept), by frame index, for "save this frame"."""

    def __init__(self, size: int = 32):
        self._items: collections.OrderedDict[int, FrameResult] = collections.OrderedDict()
        self.size = int(size)
        self._lock = threading.Lock()

    def add(self, result: FrameResult) -> None:
        with self._lock:
            self._items[result.index] = result
            self._items.move_to_end(result.index)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, index: int) -> FrameResult | None:
        with self._lock:
            return self._items.get(int(index))

    def latest(self) -> FrameResult | None:
        with self._lock:
            return next(reversed(self._items.values()), None)


class StationSink(Sink):
    """Counts every result (first among the sinks, so the events log records the counts)."""

    name = "station"

    def __init__(self, counts: Counts, scores: RecentScores, frames: RecentFrames):
        self.counts = counts
        self.scores = scores
        self.frames = frames
        self.seq = 0            # bumps with every result: the page's live updates wait on it
        self.flagged_seq = 0    # bumps with every NG/REVIEW result: the gallery reloads
        self.last_stop: dict | None = None
        self._listeners: list = []

    def listen(self, callback) -> None:
        """``callback()`` after every result (from the output thread: must be quick)."""
        self._listeners.append(callback)

    def handle(self, result: FrameResult) -> None:
        counts = self.counts.add(result.decision, result.result_time)
        result.counts = counts   # EventLog writes it (FrameResult.to_event)
        self.scores.add(result.result_time, result.score, result.decision)
        self.frames.add(result)
        self.seq += 1
        if result.flagged:
            self.flagged_seq += 1
        for cb in self._listeners:
            cb()

    def event(self, record: dict) -> None:
        if record.get("event") == "stop":
            record["counts"] = self.counts.state()   # a clean stop persists the OK count too
            self.last_stop = record


# --------------------------------------------------------------------------- gallery


GALLERY_STEM = re.compile(r"^\d{8}T\d{6}\.\d{3}Z_\d{8}$")
GALLERY_FILE = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z_\d{8})(_frame\.jpg|_overlay\.jpg|_map\.npy|\.json)$")


class Gallery:
    """The newest complete sets of the NG store (their JSON marks a complete set)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None

    def items(self, n: int = 24) -> list[dict]:
        if self.folder is None or not self.folder.is_dir():
            return []
        stems = sorted((p.stem for p in self.folder.glob("*.json") if GALLERY_STEM.match(p.stem)),
                       reverse=True)
        out = []
        for stem in stems[: max(0, int(n))]:
            try:
                record = json.loads((self.folder / f"{stem}.json").read_text())
            except (OSError, ValueError):
                continue   # deleted by the store's caps meanwhile, or being replaced
            out.append({"stem": stem, "time": record.get("time"), "frame": record.get("frame"),
                        "name": record.get("name"), "score": record.get("score"),
                        "decision": record.get("decision") or ("NG" if record.get("is_ng") else "OK"),
                        "regions": record.get("regions", []),
                        "overlay": f"/ng/{stem}_overlay.jpg", "image": f"/ng/{stem}_frame.jpg",
                        "map": f"/ng/{stem}_map.png"})
        return out

    def path(self, name: str) -> Path | None:
        """The store's file ``name`` (strictly a store file name: no path tricks), or None."""
        if self.folder is None or not GALLERY_FILE.match(name):
            return None
        p = self.folder / name
        return p if p.is_file() else None

    def map_png(self, stem: str, pixel_threshold: float) -> bytes | None:
        """The stored anomaly map as a colour PNG (same fixed scale as the overlay)."""
        import cv2

        path = self.path(f"{stem}_map.npy")
        if path is None:
            return None
        try:
            amap = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        top = 2.0 * pixel_threshold if pixel_threshold > 0 else float(max(amap.max(), 1e-6))
        heat = cv2.applyColorMap((np.clip(amap / top, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        ok, buf = cv2.imencode(".png", heat)
        return buf.tobytes() if ok else None


# --------------------------------------------------------------------------- health


def thermal_zones(root: str | os.PathLike = "/sys/class/thermal") -> list[dict]:
    """[{zone, type, celsius}] for every readable thermal zone (Jetsons: CPU-therm, GPU-therm...)."""
    out = []
    for zone in sorted(Path(root).glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
            kind = (zone / "type").read_text().strip() if (zone / "type").exists() else zone.name
        except (OSError, ValueError):
            continue
        out.append({"zone": zone.name, "type": kind, "celsius": round(milli / 1000.0, 1)})
    return out


def memory() -> dict:
    """System memory (MiB) from /proc/meminfo and this process's resident size."""
    out: dict[str, Any] = {}
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) // 1024
        out.update(total_mib=info.get("MemTotal"), available_mib=info.get("MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["process_rss_mib"] = int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def health(model: dict, thermal_root: str | os.PathLike = "/sys/class/thermal") -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"thermal": thermal_zones(thermal_root), "memory": memory(),
            "load": [round(v, 2) for v in load] if load else None, "model": model,
            "time": _iso(time.time())}


def model_identity(bundle, backend, trusted_key: str | None) -> dict:
    """What the page shows of the model: name, method, backend, precision, digest, signature."""
    from edgestad.bundle import SIGNATURE_NAME

    manifest = bundle.manifest
    signed = (bundle.path / SIGNATURE_NAME).exists() if bundle.path.is_dir() else False
    return {"bundle": bundle.source.name, "path": str(bundle.source),
            "method": manifest.get("method"), "backbone": (manifest.get("backbone") or {}).get("name"),
            "backend": backend.name, "precision": getattr(backend, "precision", ""),
            "model_file": backend.model_file.name, "model_sha256": backend.model_sha256,
            "decision_digest": digest_of(manifest),
            "signature": ("verified with the trusted key" if trusted_key and signed else
                          "signed (not checked: no --trusted-key)" if signed else "unsigned")}


def digest_of(manifest: dict) -> str | None:
    """The sha256 of the manifest's decision digest (what the page shows of it)."""
    from edgestad.bundle import DIGEST_KEY

    digest = manifest.get(DIGEST_KEY)
    return digest.get("sha256") if isinstance(digest, dict) else None


def signature_after_change(identity: dict, entry: dict) -> dict:
    """The identity after a threshold change removed the signature (``_rewrite`` does that)."""
    out = dict(identity)
    if identity.get("signature", "unsigned") != "unsigned":
        out["signature"] = (f"removed by the threshold change of {entry.get('at')}: the signature "
                            "no longer covers the decisions; sign the bundle again")
    return out



# --------------------------------------------------------------------------- the station


CAPTURE_LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
REASON_MAX = 300
THRESHOLD_LIMIT = 1e6   # |threshold| beyond this is a typo, not a setting


class StationError(Exception):
    """A refused operator action: ``status`` (HTTP) and one line; nothing was changed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Station:
    """What the operator page reads and the actions a lead takes, for one running bundle.

    ``get_thresholds()`` / ``apply_thresholds(t)`` read and replace the pipeline's thresholds (the
    next frame is decided with the new ones). ``bundle_path``: a bundle directory (thresholds are
    changed there, through ``edgestad thresholds``' recorded path); ``overridden``: thresholds
    were given on the command line, so the page must not pretend to change the bundle's.
    """

    def __init__(self, *, model: dict, get_thresholds, apply_thresholds, bundle_path: Path | None,
                 shifts: Sequence[tuple[int, int]] = (), save_ng: str | os.PathLike | None = None,
                 captures: str | os.PathLike | None = None, users=None, sessions=None,
                 overridden: bool = False, thermal_root: str | os.PathLike = "/sys/class/thermal",
                 trend_minutes: float = 30.0):
        from .accounts import Sessions

        self.counts = Counts(shifts)
        self.scores = RecentScores(trend_minutes)
        self.frames = RecentFrames()
        self.sink = StationSink(self.counts, self.scores, self.frames)
        self.gallery = Gallery(save_ng)
        self.model = dict(model)
        self.get_thresholds = get_thresholds
        self.apply_thresholds = apply_thresholds
        self.bundle_path = Path(bundle_path) if bundle_path is not None else None
        self.captures = Path(captures) if captures else None
        self.users = users
        self.sessions = sessions or Sessions()
        self.overridden = overridden
        self.thermal_root = thermal_root
        self._lock = threading.Lock()   # one threshold change / capture at a time

    # ------------------------------------------------------------------ reading

    def current_thresholds(self):
        return self.get_thresholds()

    def _thresholds_dict(self) -> dict:
        t = self.get_thresholds()
        return {"image": t.image, "review": t.review, "pixel": t.pixel}

    def state(self, snap: dict) -> dict:
        """The lamp and the counters: what the page's live updates carry."""
        last = snap.get("last_result") or {}
        age = snap.get("last_result_age_s")
        running = bool(snap.get("running", True))
        connected = bool(snap.get("source_connected", True))
        lat = snap.get("latency_ms") or {}
        return {
            "decision": last.get("decision"), "score": last.get("score"), "frame": last.get("frame"),
            "name": last.get("name"), "time": last.get("time"), "regions": len(last.get("regions") or []),
            "last_result_age_s": age,
            "run_state": "stopped" if not running else "running" if connected else "camera lost",
            "thresholds": self._thresholds_dict(),
            "counts": self.counts.snapshot(),
            "fps": snap.get("fps_recent"), "latency_p50_ms": lat.get("p50"), "latency_p95_ms": lat.get("p95"),
            "frames_dropped": snap.get("frames_dropped"), "frames_bad": snap.get("frames_bad"),
            "seq": self.sink.seq, "flagged_seq": self.sink.flagged_seq,
            "model": {k: self.model.get(k) for k in ("bundle", "method", "backend", "precision")},
            "source": snap.get("source"),
        }

    def scores_summary(self, minutes: float) -> dict:
        return self.scores.summary(minutes, self._thresholds_dict())

    def health(self) -> dict:
        return health(self.model, self.thermal_root)

    def thresholds_info(self) -> dict:
        history = []
        rule = {}
        if self.bundle_path is not None and (self.bundle_path / "manifest.json").is_file():
            try:
                manifest = json.loads((self.bundle_path / "manifest.json").read_text())
                history = manifest.get("thresholds_history") or []
                rule = (manifest.get("thresholds") or {}).get("rule") or {}
            except (OSError, ValueError):
                pass
        return {"thresholds": self._thresholds_dict(), "history": history[-20:],
                "promised_false_reject": rule.get("image_promised_false_reject"),
                "promise_bound": rule.get("image_promise_bound"),
                "rule": rule.get("image"), "changeable": self._why_not_changeable() is None,
                "why_not": self._why_not_changeable(), "signature": self.model.get("signature")}

    # ------------------------------------------------------------------ thresholds

    def _why_not_changeable(self) -> str | None:
        if self.overridden:
            return ("thresholds were set on the command line (--image-threshold/--pixel-threshold); "
                    "change them there or drop the override")
        if self.bundle_path is None or not self.bundle_path.is_dir():
            return ("the bundle is an archive; thresholds are changed in a bundle directory "
                    "(unpack it and run from the directory)")
        return None

    @staticmethod
    def _number(body: dict, key: str, optional: bool = False) -> float | None:
        value = body.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StationError(f"{key}: a number is needed, got {value!r}")
        value = float(value)
        if not np.isfinite(value) or abs(value) > THRESHOLD_LIMIT:
            raise StationError(f"{key}: {value} is out of range (a finite number within "
                               f"±{THRESHOLD_LIMIT:g})")
        return value

    @staticmethod
    def _reason(body: dict, default: str) -> str:
        reason = body.get("reason") or default
        if not isinstance(reason, str) or len(reason) > REASON_MAX:
            raise StationError(f"reason: text of at most {REASON_MAX} characters")
        return reason.strip() or default

    def change_thresholds(self, user: str, body: dict) -> dict:
        """Set the image (NG) threshold and the REVIEW band (``review``: a number, or null for
        no band) through the bundle's recorded path; the pipeline uses them from the next frame."""
        image = self._number(body, "image")
        review = self._number(body, "review", optional=True)
        if review is not None and not review < image:
            raise StationError(f"review: the REVIEW threshold {review:g} must be below the NG "
                               f"threshold {image:g}")
        return self._change(user, image, review, self._reason(body, "changed on the operator page"))

    def revert_thresholds(self, user: str, body: dict) -> dict:
        """Undo the last threshold change (a new, recorded change back to its old values)."""
        info = self.thresholds_info()
        last = next((e for e in reversed(info["history"]) if e.get("change") == "thresholds"), None)
        if last is None:
            raise StationError("nothing to revert: the bundle has no recorded threshold change", 409)
        old = last.get("old") or {}
        if "image" not in old:
            raise StationError("the last change has no old image threshold to go back to", 409)
        reason = self._reason(body, f"revert of the change of {last.get('at')} by {last.get('by')}")
        return self._change(user, float(old["image"]), old.get("image_review"), reason)

    def _change(self, user: str, image: float, review: float | None, reason: str) -> dict:
        from edgestad.bundle import BundleError, load_bundle
        from edgestad.bundle_thresholds import change_thresholds
        from edgestad.thresholds import ThresholdError

        from .results import Thresholds

        why_not = self._why_not_changeable()
        if why_not:
            raise StationError(why_not, 409)
        current = self.get_thresholds()
        with self._lock:
            try:
                entry = change_thresholds(
                    self.bundle_path, image=image,
                    review=review,
                    no_review=review is None and current.review is not None,
                    reason=reason, by=f"{user} (operator page)",
                    log=log.info)
                manifest = load_bundle(self.bundle_path).manifest
            except (BundleError, ThresholdError) as exc:   # nothing was changed
                raise StationError(str(exc).splitlines()[0], 400) from None
            new = Thresholds.from_manifest(manifest)
            self.apply_thresholds(new)
            self.model = signature_after_change(self.model, entry)
            self.model["decision_digest"] = digest_of(manifest)
        return {"entry": entry, "thresholds": self._thresholds_dict(),
                "signature": self.model.get("signature")}

    # ------------------------------------------------------------------ capture

    def capture(self, user: str, body: dict) -> dict:
        """Write a frame the lead chose into the capture folder, MVTec layout: ``good`` →
        ``train/good/``; a defect label → ``test/<label>/`` with an empty mask in
        ``ground_truth/<label>/`` (an image-level label; draw the defect to use it for AU-PRO).
        A JSON sidecar beside the image says where it came from."""
        import cv2

        if self.captures is None:
            raise StationError("no capture folder: start the runtime with --captures DIR", 409)
        label = body.get("label")
        if not isinstance(label, str) or not CAPTURE_LABEL.match(label):
            raise StationError("label: 'good' or a defect name of lowercase letters, digits, '_' "
                               f"or '-' (e.g. scratch), got {label!r}")
        picture, info = self._picture(body)
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{info['frame']:08d}"
        if label == "good":
            folder, mask_folder = self.captures / "train" / "good", None
        else:
            folder, mask_folder = self.captures / "test" / label, self.captures / "ground_truth" / label
        ok, png = cv2.imencode(".png", picture)
        if not ok:
            raise StationError("the frame could not be encoded as PNG", 500)
        written: list[Path] = []
        from edgestad.files import atomic_write_bytes, atomic_write_json
        with self._lock:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                written.append(atomic_write_bytes(folder / f"{stem}.png", png.tobytes()))
                if mask_folder is not None:
                    mask_folder.mkdir(parents=True, exist_ok=True)
                    ok, mask = cv2.imencode(".png", np.zeros(picture.shape[:2], np.uint8))
                    written.append(atomic_write_bytes(mask_folder / f"{stem}_mask.png", mask.tobytes()))
                sidecar = {"label": label, "by": f"{user} (operator page)", "at": _iso(time.time()),
                           "bundle": self.model.get("bundle"), "model_sha256": self.model.get("model_sha256"),
                           "mask": "empty: image-level label only" if mask_folder else None, **info}
                written.append(atomic_write_json(folder / f"{stem}.json", sidecar))
            except OSError as exc:
                for path in written:   # all or nothing
                    try:
                        path.unlink()
                    except OSError:
                        pass
                raise StationError(f"capture folder {self.captures} is not writable: "
                                   f"{exc.strerror or exc}", 500) from None
        return {"image": str(written[0]), "files": [str(p) for p in written], "label": label}

    def _picture(self, body: dict):
        import cv2

        if body.get("stem") is not None:
            stem = body["stem"]
            path = self.gallery.path(f"{stem}_frame.jpg") if isinstance(stem, str) else None
            record = self.gallery.path(f"{stem}.json") if isinstance(stem, str) else None
            if path is None or record is None:
                raise StationError(f"stem: no saved NG part {stem!r} in the NG store", 404)
            picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
            event = json.loads(record.read_text())
            return picture, {"frame": int(event.get("frame", 0)), "score": event.get("score"),
                             "decision": event.get("decision"), "source_time": event.get("time"),
                             "from": f"NG store {stem}"}
        frame = body.get("frame")
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise StationError(f"frame: a frame number is needed (or stem), got {frame!r}")
        result = self.frames.get(frame)
        if result is None or result.frame is None:
            raise StationError(f"frame {frame} is no longer held (the last {self.frames.size} frames "
                               "are); save it from the gallery instead", 404)
        return result.frame_bgr(), {"frame": result.index, "score": result.score,
                                    "decision": result.decision.upper(),
                                    "source_time": _iso(result.capture_time),
                                    "from": result.name or "live frame"}

