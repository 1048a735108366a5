"""PLC adapters: the line's PLC reads OK / NG / REVIEW over OPC UA or Modbus TCP.

Both adapters are sinks (see ``sinks.py``): ``handle(result)`` runs in the pipeline's output
thread and only records the result and wakes the server (a lock and a ``call_soon_threadsafe``,
microseconds); each server runs its own asyncio event loop in a daemon thread. The libraries are
optional and imported only when an adapter is built (``pip install asyncua`` / ``pip install
pymodbus``), so the runtime itself needs neither.

What both publish (``PlcStatus``): the last part's decision, score, frame id and time; counters
since start (``initial_counts`` restores them after a restart); the image and REVIEW thresholds; a
heartbeat that counts up every ``heartbeat_s`` while the runtime is alive; and ``Healthy``:
the pipeline is running, the source is connected and the last result is younger than 10 s (without
a pipeline status callback: a result was seen in the last 10 s). A line fed by triggered parts that
stands idle for more than 10 s therefore reads not healthy until the next part.

OPC UA (``OpcUaSink``, ``--opcua HOST:PORT``, default port 4840)
-----------------------------------------------------------------

Endpoint ``opc.tcp://HOST:PORT/edgestad/``, security mode None (no signing, no encryption),
anonymous clients only. Under ``Objects`` an object ``edgestad`` in namespace ``urn:edgestad``
(its index is usually 2: read it from the server's NamespaceArray) holds these variables, all
read-only; browse path ``0:Objects/<ns>:edgestad/<ns>:<Name>``, node id ``ns=<ns>;s=edgestad.<Name>``.

| Variable          | Type     | Meaning                                                                |
|-------------------|----------|------------------------------------------------------------------------|
| `Decision`        | String   | last part: `OK`, `NG`, `REVIEW`; empty before the first part           |
| `DecisionCode`    | Int32    | 0 none yet, 1 OK, 2 REVIEW, 3 NG                                       |
| `Score`           | Double   | anomaly score of the last part (NaN before the first part)             |
| `ImageThreshold`  | Double   | NG when score > this (NaN when unknown)                                |
| `ReviewThreshold` | Double   | REVIEW when score > this and not NG; NaN when the bundle has no band   |
| `FrameId`         | Int64    | frame index of the last part (-1 before the first part)                |
| `Timestamp`       | DateTime | UTC time the last result was ready (null DateTime before the first)    |
| `Total`           | UInt64   | parts judged since start (plus restored counts)                        |
| `OkCount`         | UInt64   | OK parts                                                               |
| `NgCount`         | UInt64   | NG parts                                                               |
| `ReviewCount`     | UInt64   | REVIEW parts                                                           |
| `Heartbeat`       | UInt32   | +1 every heartbeat period (1 s by default) while the runtime is alive   |
| `Healthy`         | Boolean  | running, source connected, last result younger than 10 s               |

Method ``Trigger()`` (no arguments, no results; only with ``--trigger opcua``): asks for one frame.
Every part writes all its values at once, so ``Decision``, ``Score`` and ``FrameId`` read in one
Read request always belong to the same part; subscribe to ``FrameId`` (or ``Total``) to be told
of each new part - ``Decision`` does not change between two NG parts in a row. Parts arriving
faster than the server loop publishes are coalesced (the counters still count every part).

Modbus TCP (``ModbusSink``, ``--modbus HOST:PORT``, default port 502)
----------------------------------------------------------------------

Unit id 1 (``unit_id``; 0 answers every unit id), 0-based addresses, read-only (writes are
answered with exception 01, illegal function). 32-bit values take two registers, high word first
(big-endian word order); ×1000 values are signed (two's complement), rounded, and clamped to
±2147483647; -2147483648 (0x8000_0000) means "no value". Counters, frame id and heartbeat wrap around. The coils are mirrored as
discrete inputs, the holding registers as input registers.

| Coil / discrete input | Meaning                                                   |
|-----------------------|-----------------------------------------------------------|
| 0                     | last part OK                                              |
| 1                     | last part NG                                              |
| 2                     | last part REVIEW                                          |
| 3                     | Healthy                                                   |
| 4                     | heartbeat toggle (flips every heartbeat period)           |

| Holding / input register | Type   | Meaning                                                          |
|--------------------------|--------|------------------------------------------------------------------|
| 0-1                      | int32  | score × 1000 of the last part (-2147483648 before the first)     |
| 2-3                      | uint32 | frame id of the last part (0 before the first)                   |
| 4-5                      | uint32 | total parts                                                      |
| 6-7                      | uint32 | OK parts                                                         |
| 8-9                      | uint32 | NG parts                                                         |
| 10-11                    | uint32 | REVIEW parts                                                     |
| 12                       | uint16 | decision code: 0 none yet, 1 OK, 2 REVIEW, 3 NG                  |
| 13                       | uint16 | heartbeat counter (+1 every heartbeat period, wraps at 65535)    |
| 14-15                    | int32  | image threshold × 1000 (-2147483648 when unknown)                |
| 16-17                    | int32  | review threshold × 1000 (-2147483648 when the bundle has no band)|

Example: score -0.25 reads as registers 0-1 = 0xFFFF, 0xFF06 (-250).

``TriggerGate`` connects the OPC UA ``Trigger`` method to the frame grabber: ``fire()`` counts a
trigger, ``wait()`` consumes one.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from .config import parse_host_port
from .errors import OutputError
from .results import FrameResult, Thresholds
from .sinks import Sink

log = logging.getLogger("edgestad.runtime.plc")

HEALTHY_MAX_AGE_S = 10.0  # Healthy needs a result younger than this
START_TIMEOUT_S = 15.0  # start() gives up when the server is not listening by then
CLOSE_TIMEOUT_S = 10.0

DECISION_CODES = {"ok": 1, "review": 2, "ng": 3}  # 0: no part judged yet
COUNT_KEYS = ("total", "ok", "ng", "review")

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
NO_VALUE_I32 = INT32_MIN  # Modbus sentinel for "no value" (no REVIEW band, nothing judged yet)
MODBUS_REGISTERS = 18
MODBUS_COILS = 5

OPCUA_PATH = "edgestad/"  # the endpoint path: opc.tcp://host:port/edgestad/


# --------------------------------------------------------------------------- helpers


def _import(module: str, option: str, package: str) -> Any:
    """Import an optional library, or say in one line which option needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OutputError(f"{option} needs the {package} package, which is not installed here: "
                          f"pip install {package}") from None


def _check_bindable(host: str, port: int, option: str, what: str) -> None:
    """Fail early, with the operating system's reason, when host:port cannot be listened on.

    SO_REUSEADDR as asyncio's ``create_server`` sets it: a port whose last connection is in
    TIME_WAIT is free to listen on, a port another server listens on is not.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OutputError(f"{option}: cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise OutputError(_bind_message(option, what, host, port, exc)) from None


def _bind_message(option: str, what: str, host: str, port: int, exc: BaseException) -> str:
    msg = f"{option}: cannot serve {what} on {host}:{port}: {_first_line(exc)}"
    if isinstance(exc, PermissionError) and port < 1024:
        msg += " (ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port such as 5020)"
    return msg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _heartbeat_period(heartbeat_s: float, option: str) -> float:
    try:
        value = float(heartbeat_s)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise OutputError(f"{option}: the heartbeat period must be a positive number of seconds, got {heartbeat_s!r}")
    return value


# --------------------------------------------------------------------------- shared state


class PlcStatus:
    """What both adapters publish; thread-safe (one lock, held for microseconds).

    ``update(result)`` (output thread) records the last part and counts it; ``beat()`` (the
    adapter's heartbeat) advances the heartbeat and polls ``status()`` - a
    ``Pipeline.snapshot``-like dict with ``running``, ``source_connected``, ``last_result_age_s``
    and ``thresholds`` - for ``Healthy``; ``values()`` is everything published, as plain Python
    values (``None`` where there is no value).
    """

    def __init__(self, status: Callable[[], dict] | None = None, initial_counts: dict | None = None,
                 max_result_age_s: float = HEALTHY_MAX_AGE_S):
        self._status = status
        self.max_result_age_s = float(max_result_age_s)
        self._lock = threading.Lock()
        self._counts = _check_counts(initial_counts)
        self._decision = ""  # "ok" / "review" / "ng"
        self._score: float | None = None
        self._frame_id: int | None = None
        self._result_time: float | None = None  # wall clock of the last result
        self._seen: float | None = None  # monotonic time update() last ran
        self._heartbeat = 0
        self._thresholds: Thresholds | None = None  # set_thresholds(): wins over status()["thresholds"]
        self._status_thresholds: tuple[float | None, float | None] | None = None
        self._polled: dict | None = None  # last status() result, reduced to what Healthy needs
        self._stopped = False

    def update(self, result: FrameResult) -> None:
        decision = result.decision
        with self._lock:
            self._decision = decision
            self._score = float(result.score)
            self._frame_id = int(result.index)
            self._result_time = float(result.result_time)
            self._seen = time.monotonic()
            self._counts["total"] += 1
            self._counts[decision] += 1

    def set_thresholds(self, thresholds: Thresholds | None) -> None:
        with self._lock:
            self._thresholds = thresholds

    def mark_stopped(self) -> None:
        """The adapter is closing: Healthy reads false from now on."""
        with self._lock:
            self._stopped = True

    def beat(self) -> None:
        """One heartbeat: advance the counter, then poll the pipeline's status for Healthy."""
        with self._lock:
            self._heartbeat += 1
        self.poll()

    def poll(self) -> None:
        """Read ``status()`` for Healthy and the thresholds.

        Called by the adapters' heartbeat task off their event loop, because ``status()`` (a
        pipeline snapshot) may take a millisecond or two."""
        polled = None
        thresholds = None
        if self._status is not None:
            try:
                snap = self._status() or {}
                age = snap.get("last_result_age_s")
                polled = {"running": bool(snap.get("running")),
                          "connected": bool(snap.get("source_connected")),
                          "age": None if age is None else float(age),
                          "at": time.monotonic()}
                thr = snap.get("thresholds") or {}
                if thr.get("image") is not None:
                    thresholds = (float(thr["image"]), None if thr.get("review") is None else float(thr["review"]))
            except Exception as exc:  # noqa: BLE001 - a failing status reads as not healthy
                log.debug("plc: status() failed: %s", exc)
                polled = {"running": False, "connected": False, "age": None, "at": time.monotonic()}
        with self._lock:
            if polled is not None:
                self._polled = polled
            if thresholds is not None:
                self._status_thresholds = thresholds

    def _healthy(self, now: float) -> bool:
        if self._stopped:
            return False
        ages = []
        if self._seen is not None:
            ages.append(now - self._seen)
        if self._status is None:
            return bool(ages) and min(ages) < self.max_result_age_s
        p = self._polled
        if p is None or not (p["running"] and p["connected"]):
            return False
        if p["age"] is not None:  # the pipeline's age at the poll, aged since
            ages.append(p["age"] + (now - p["at"]))
        return bool(ages) and min(ages) < self.max_result_age_s

    def values(self) -> dict:
        now = time.monotonic()
        with self._lock:
            if self._thresholds is not None:
                image, review = self._thresholds.image, self._thresholds.review
            elif self._status_thresholds is not None:
                image, review = self._status_thresholds
            else:
                image = review = None
            return {
                "decision": self._decision.upper(),
                "decision_code": DECISION_CODES.get(self._decision, 0),
                "score": self._score,
                "frame_id": self._frame_id,
                "timestamp": self._result_time,
                **{k: self._counts[k] for k in COUNT_KEYS},
                "heartbeat": self._heartbeat,
                "healthy": self._healthy(now),
                "image_threshold": None if image is None else float(image),
                "review_threshold": None if review is None else float(review),
            }

    def counts(self) -> dict:
        """total / ok / ng / review: what the runtime persists across restarts."""
        with self._lock:
            return dict(self._counts)


def _check_counts(initial: dict | None) -> dict:
    counts = {k: 0 for k in COUNT_KEYS}
    if not initial:
        return counts
    unknown = set(initial) - set(COUNT_KEYS)
    if unknown:
        raise OutputError(f"initial PLC counts: unknown key(s) {sorted(unknown)}; expected {list(COUNT_KEYS)}")
    for key in ("ok", "ng", "review", "total"):
        if key not in initial:
            continue
        value = initial[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OutputError(f"initial PLC counts: {key} must be a non-negative integer, got {value!r}")
        counts[key] = value
    parts = counts["ok"] + counts["ng"] + counts["review"]
    if "total" not in initial:
        counts["total"] = parts
    elif counts["total"] < parts:
        raise OutputError(f"initial PLC counts: total {counts['total']} is below ok + ng + review = {parts}")
    return counts


# --------------------------------------------------------------------------- server thread


class _ServerThread(Sink):
    """An asyncio server in its own daemon thread: start() waits until it listens, close() stops it.

    Subclasses implement ``_serve_setup()`` (build and start the server; runs on the loop),
    ``_publish()`` (push ``self.plc.values()`` into the server; loop) and ``_serve_teardown()``.
    """

    option = ""
    what = ""

    def __init__(self, host: str, port: int, status, thresholds, heartbeat_s, initial_counts):
        self.host, self.port = host, port
        self.heartbeat_s = _heartbeat_period(heartbeat_s, self.option)
        self.plc = PlcStatus(status, initial_counts)
        if thresholds is not None:
            self.plc.set_thresholds(thresholds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------ sink API (output thread)

    def handle(self, result: FrameResult) -> None:
        self.plc.update(result)
        self._request_publish()

    def set_thresholds(self, thresholds: Thresholds) -> None:
        self.plc.set_thresholds(thresholds)
        self._request_publish()

    def values(self) -> dict:
        return self.plc.values()

    def _request_publish(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started: the values are published when it starts
        try:
            loop.call_soon_threadsafe(wake.set)  # coalesces: one publish serves any number of results
        except RuntimeError:
            pass  # the loop is closed: the server has stopped

    # ------------------------------------------------------------ lifecycle

    def start(self):
        if self._thread is not None:
            return self
        if self._closed:
            raise OutputError(f"{self.option}: this {self.what} server was closed; build a new one")
        _check_bindable(self.host, self.port, self.option, self.what)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"edgestad-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.close()
            raise OutputError(f"{self.option}: the {self.what} server on {self.host}:{self.port} "
                              f"did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            self.close()
            raise OutputError(_bind_message(self.option, self.what, self.host, self.port, self._error))
        log.info("%s: %s server listening on %s", self.name, self.what, self.describe())
        return self

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.plc.mark_stopped()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:
            pass  # loop already closed (the server failed to start)
        thread.join(CLOSE_TIMEOUT_S)
        if thread.is_alive():
            log.warning("%s: server thread did not stop within %.0f s", self.name, CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start() or logged
            if not self._ready.is_set():
                self._error = exc
            else:
                log.error("%s: server failed: %s", self.name, exc)
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _main(self) -> None:
        try:
            await self._serve_setup()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            try:
                await self._serve_teardown()
            except Exception:  # noqa: BLE001 - the setup error is the one to report
                pass
            return
        await self._publish()
        tasks = [asyncio.ensure_future(self._publisher()), asyncio.ensure_future(self._heartbeat())]
        self._ready.set()
        try:
            await self._stop.wait()
            await self._publish()  # Healthy false (mark_stopped) for whoever still reads
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._serve_teardown()

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish()
            except Exception as exc:  # noqa: BLE001 - keep serving; the next result tries again
                log.warning("%s: publishing failed: %s", self.name, exc)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.plc.poll)  # Healthy from the first read on
        self._wake.set()
        next_beat = loop.time() + self.heartbeat_s
        while True:
            await asyncio.sleep(max(0.0, next_beat - loop.time()))
            next_beat += self.heartbeat_s
            if next_beat < loop.time():  # fell behind (suspended machine): do not burst
                next_beat = loop.time() + self.heartbeat_s
            await loop.run_in_executor(None, self.plc.beat)  # status() may take a moment
            self._wake.set()

    async def _serve_setup(self) -> None:
        raise NotImplementedError

    async def _publish(self) -> None:
        raise NotImplementedError

    async def _serve_teardown(self) -> None:
        pass


# --------------------------------------------------------------------------- OPC UA

# Browse name -> (values() key, OPC UA type name); the order is the order in the address space.
OPCUA_VARIABLES = (
    ("Decision", "decision", "String"),
    ("DecisionCode", "decision_code", "Int32"),
    ("Score", "score", "Double"),
    ("ImageThreshold", "image_threshold", "Double"),
    ("ReviewThreshold", "review_threshold", "Double"),
    ("FrameId", "frame_id", "Int64"),
    ("Timestamp", "timestamp", "DateTime"),
    ("Total", "total", "UInt64"),
    ("OkCount", "ok", "UInt64"),
    ("NgCount", "ng", "UInt64"),
    ("ReviewCount", "review", "UInt64"),
    ("Heartbeat", "heartbeat", "UInt32"),
    ("Healthy", "healthy", "Boolean"),
)
OPCUA_TYPES = {name: type_name for name, _, type_name in OPCUA_VARIABLES}
NULL_DATETIME = datetime(1601, 1, 1, tzinfo=timezone.utc)  # OPC UA's "no time" (encodes as 0)


def opcua_values(values: dict) -> dict:
    """``PlcStatus.values()`` -> {browse name: Python value of its OPC UA type}."""
    def number(x):
        return float("nan") if x is None else float(x)

    ts = values["timestamp"]
    out = {
        "decision": values["decision"],
        "decision_code": int(values["decision_code"]),
        "score": number(values["score"]),
        "image_threshold": number(values["image_threshold"]),
        "review_threshold": number(values["review_threshold"]),
        "frame_id": -1 if values["frame_id"] is None else int(values["frame_id"]),
        "timestamp": NULL_DATETIME if ts is None else datetime.fromtimestamp(ts, timezone.utc),
        **{k: int(values[k]) % 2**64 for k in COUNT_KEYS},
        "heartbeat": int(values["heartbeat"]) % 2**32,
        "healthy": bool(values["healthy"]),
    }
    return {name: out[key] for name, key, _ in OPCUA_VARIABLES}


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (nothing to republish)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


class OpcUaSink(_ServerThread):
    """OPC UA server (asyncua) publishing the last decision, counters, heartbeat and health.

    ``url`` is the endpoint; ``start()`` returns once it listens. ``on_trigger`` adds the method
    ``Trigger()``, which calls it from the server's worker thread (it must be thread-safe, as
    ``TriggerGate.fire`` is). See the module docstring for the address space.
    """

    name = "opcua"
    option = "--opcua"
    what = "OPC UA"
    DEFAULT_PORT = 4840

    def __init__(self, address: str, status: Callable[[], dict] | None = None, thresholds: Thresholds | None = None,
                 on_trigger: Callable[[], None] | None = None, heartbeat_s: float = 1.0,
                 namespace: str = "urn:edgestad", initial_counts: dict | None = None):
        host, port = parse_host_port(address, self.option, self.DEFAULT_PORT, min_port=1, error=OutputError)
        asyncua = _import("asyncua", self.option, "asyncua")
        self._ua = asyncua.ua
        self._server_cls = asyncua.Server
        super().__init__(host, port, status, thresholds, heartbeat_s, initial_counts)
        self.namespace = namespace
        self.on_trigger = on_trigger
        self.namespace_index: int | None = None
        self.triggers = 0  # Trigger() calls served
        self._trigger_lock = threading.Lock()
        self._server = None
        self._nodes: dict[str, Any] = {}  # browse name -> NodeId
        self._published: dict[str, Any] = {}  # browse name -> last value written

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"opc.tcp://{host}:{self.port}/{OPCUA_PATH}"

    def describe(self) -> str:
        return self.url

    async def _serve_setup(self) -> None:
        ua = self._ua
        server = self._server_cls()
        self._server = server
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("edgestad")
        # A line network: no certificates to manage, anonymous read access (see docs/operator/plc.md).
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = await server.register_namespace(self.namespace)
        self.namespace_index = idx
        obj = await server.nodes.objects.add_object(ua.NodeId("edgestad", idx), ua.QualifiedName("edgestad", idx))
        initial = opcua_values(self.plc.values())
        for name, _, type_name in OPCUA_VARIABLES:
            vtype = getattr(ua.VariantType, type_name)
            node = await obj.add_variable(ua.NodeId(f"edgestad.{name}", idx), ua.QualifiedName(name, idx),
                                          ua.Variant(initial[name], vtype), varianttype=vtype)
            # read-only is asyncua's default for new variables: PLCs cannot write any of them
            self._nodes[name] = node.nodeid
            self._published[name] = initial[name]
        if self.on_trigger is not None:
            await obj.add_method(ua.NodeId("edgestad.Trigger", idx), ua.QualifiedName("Trigger", idx),
                                 self._trigger, [], [])
        await server.start()

    def _trigger(self, parent, *args):
        """The Trigger() method. asyncua runs a plain (not async) method in its worker thread pool,
        so on_trigger never runs on - or blocks - the server's event loop."""
        if args:
            return self._ua.StatusCode(self._ua.StatusCodes.BadTooManyArguments)
        self.on_trigger()
        with self._trigger_lock:
            self.triggers += 1
        return []

    async def _publish(self) -> None:
        """Write the values that changed (one pass on the loop, so a Read sees one part's values)."""
        ua = self._ua
        now = datetime.now(timezone.utc)
        for name, value in opcua_values(self.plc.values()).items():
            if _same(self._published.get(name), value):
                continue
            vtype = getattr(ua.VariantType, OPCUA_TYPES[name])
            await self._server.write_attribute_value(
                self._nodes[name], ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now))
            self._published[name] = value

    async def _serve_teardown(self) -> None:
        if self._server is not None:
            await self._server.stop()


# --------------------------------------------------------------------------- Modbus TCP


def _u32_words(n: int) -> list[int]:
    n &= 0xFFFFFFFF
    return [n >> 16, n & 0xFFFF]  # high word first


def _milli_words(x: float | None) -> list[int]:
    """x × 1000 as int32 in two registers; None / NaN -> the no-value sentinel; clamped otherwise
    (never to the sentinel itself)."""
    if x is None or math.isnan(x):
        return _u32_words(NO_VALUE_I32)
    milli = x * 1000.0
    if math.isinf(milli):
        n = INT32_MAX if milli > 0 else INT32_MIN + 1
    else:
        n = max(INT32_MIN + 1, min(INT32_MAX, int(round(milli))))
    return _u32_words(n)


def modbus_registers(values: dict) -> list[int]:
    """``PlcStatus.values()`` -> holding registers 0-17 (see the module docstring)."""
    regs = (
        _milli_words(values["score"])
        + _u32_words(values["frame_id"] or 0)
        + _u32_words(values["total"])
        + _u32_words(values["ok"])
        + _u32_words(values["ng"])
        + _u32_words(values["review"])
        + [int(values["decision_code"]), int(values["heartbeat"]) & 0xFFFF]
        + _milli_words(values["image_threshold"])
        + _milli_words(values["review_threshold"])
    )
    assert len(regs) == MODBUS_REGISTERS
    return regs


def modbus_coils(values: dict) -> list[bool]:
    """``PlcStatus.values()`` -> coils 0-4: OK, NG, REVIEW, Healthy, heartbeat toggle."""
    code = values["decision_code"]
    coils = [code == 1, code == 3, code == 2, bool(values["healthy"]), bool(values["heartbeat"] & 1)]
    assert len(coils) == MODBUS_COILS
    return coils


class ModbusSink(_ServerThread):
    """Modbus TCP server (pymodbus >= 3.15) with the map in the module docstring.

    The register images are rebuilt on the server's loop after each result and heartbeat; every
    request copies them into pymodbus's device memory (the SimDevice ``action`` hook, called on
    the loop for each request), so a read always returns one consistent image.
    """

    name = "modbus"
    option = "--modbus"
    what = "Modbus TCP"
    DEFAULT_PORT = 502

    def __init__(self, address: str, status: Callable[[], dict] | None = None, thresholds: Thresholds | None = None,
                 heartbeat_s: float = 1.0, unit_id: int = 1, initial_counts: dict | None = None):
        host, port = parse_host_port(address, self.option, self.DEFAULT_PORT, min_port=1, error=OutputError)
        _import("pymodbus", self.option, "pymodbus")
        try:
            from pymodbus.constants import ExcCodes
            from pymodbus.server import ModbusTcpServer
            from pymodbus.simulator import DataType, SimData, SimDevice
        except ImportError:
            raise OutputError(f"{self.option} needs pymodbus 3.15 or newer (SimDevice), this one is older: "
                              f"pip install -U pymodbus") from None
        if isinstance(unit_id, bool) or not isinstance(unit_id, int) or not 0 <= unit_id <= 255:
            raise OutputError(f"{self.option}: the unit id must be 0..255 (0: answer every unit id), got {unit_id!r}")
        super().__init__(host, port, status, thresholds, heartbeat_s, initial_counts)
        self.unit_id = unit_id
        self._lib = (ExcCodes, ModbusTcpServer, DataType, SimData, SimDevice)
        self._server = None
        self._registers = [0] * MODBUS_REGISTERS
        self._coil_word = 0  # coils packed as pymodbus stores them: coil n is bit n of word 0

    def _device(self):
        _, _, DataType, SimData, SimDevice = self._lib

        def bits():
            return [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)]

        def registers():
            return [SimData(0, count=MODBUS_REGISTERS, values=0, datatype=DataType.REGISTERS, readonly=True)]

        # Four separate blocks (coils, discrete inputs, holding, input registers), bit-addressed coils.
        return SimDevice(id=self.unit_id, simdata=(bits(), bits(), registers(), registers()), action=self._on_request)

    async def _on_request(self, function_code: int, start_address: int, address: int, count: int,
                          registers: list[int], set_values) -> Any:
        """Runs on the loop for every request, before pymodbus answers from ``registers``."""
        if set_values is not None:
            return self._lib[0].ILLEGAL_FUNCTION  # read-only: the PLC cannot change what it reads
        if function_code in (1, 2):  # coils, discrete inputs
            registers[0] = self._coil_word
        else:  # holding, input registers
            registers[:MODBUS_REGISTERS] = self._registers
        return None

    async def _serve_setup(self) -> None:
        ModbusTcpServer = self._lib[1]
        self._server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError:  # pymodbus logs the OS error and says only "Could not start listen"
            raise OSError("cannot listen (is the port in use or the address not on this machine?)") from None

    async def _publish(self) -> None:
        values = self.plc.values()
        self._registers = modbus_registers(values)
        self._coil_word = sum(1 << i for i, bit in enumerate(modbus_coils(values)) if bit)

    async def _serve_teardown(self) -> None:
        if self._server is not None:
            await self._server.shutdown()


# --------------------------------------------------------------------------- trigger


class TriggerGate:
    """Triggers from the PLC (OPC UA ``Trigger()``) handed to the frame grabber one at a time.

    ``fire()`` may be called from any thread and counts; ``wait()`` consumes one trigger, or
    returns False when ``stop`` is set or ``timeout`` passes first.
    """

    STOP_POLL_S = 0.05  # how often wait() looks at the stop event (nothing can notify it)

    def __init__(self):
        self._cond = threading.Condition()
        self._pending = 0
        self.fired = 0
        self.consumed = 0

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def fire(self) -> None:
        with self._cond:
            self._pending += 1
            self.fired += 1
            self._cond.notify()

    def wait(self, stop: threading.Event, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if stop.is_set():
                    return False
                if self._pending > 0:
                    self._pending -= 1
                    self.consumed += 1
                    return True
                slice_s = self.STOP_POLL_S
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    slice_s = min(slice_s, left)
                self._cond.wait(slice_s)
