"""PLC adapters against real clients on loopback: an asyncua OPC UA client and a pymodbus Modbus TCP
client read what OpcUaSink / ModbusSink publish while results are fed through ``handle()`` as the
pipeline's output thread would. The shared state (PlcStatus), the trigger gate and the error
paths (bad address, busy port, missing library) are checked without the libraries."""

from __future__ import annotations

import math
import random
import socket
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from edgestad.runtime.errors import ConfigError, OutputError
from edgestad.runtime.config import parse_host_port
from edgestad.runtime.plc import ModbusSink, OpcUaSink, PlcStatus, TriggerGate
from edgestad.runtime.results import FrameResult, Thresholds
from helpers import free_port, wait_for

NO_VALUE = -(2**31)


def result(index: int, score: float, decision: str, result_time: float | None = None) -> FrameResult:
    """A FrameResult as the pipeline builds it (the decision is given, as Thresholds.decide made it)."""
    assert decision in ("ok", "review", "ng")
    now = time.time() if result_time is None else result_time
    mono = time.monotonic()
    return FrameResult(index, "", now, mono, mono, mono, now, float(score), decision == "ng", [], 0,
                       np.zeros((8, 8), np.float32), is_review=decision == "review")


def mixed_results(n: int, seed: int, start_index: int = 0) -> list[FrameResult]:
    rng = random.Random(seed)
    thr = Thresholds(pixel=0.5, image=1.0, review=0.6)
    out = []
    for i in range(n):
        score = rng.uniform(-0.5, 2.0)
        out.append(result(start_index + i, score, thr.decide(score)))
    return out


def expected_counts(results: list[FrameResult], base: dict | None = None) -> dict:
    base = base or {"total": 0, "ok": 0, "ng": 0, "review": 0}
    counts = dict(base)
    for r in results:
        counts["total"] += 1
        counts[r.decision] += 1
    return counts


def listening_socket(port: int) -> socket.socket:
    """A server socket on the port, set up as servers are (SO_REUSEADDR): connections the closed server
    left in TIME_WAIT do not block it, a server still listening there does."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


# --------------------------------------------------------------------------- without the libraries


def test_parse_host_port():
    """One parser for every address option: the PLC servers' (default port, port 0 refused) and
    --http's (no default port; 0 = any free port)."""
    def plc(text, option="--opcua", default=4840):
        return parse_host_port(text, option, default, min_port=1, error=OutputError)

    assert plc("0.0.0.0:4841") == ("0.0.0.0", 4841)
    assert plc(":5020", "--modbus", 502) == ("127.0.0.1", 5020)
    assert plc("5020", "--modbus", 502) == ("127.0.0.1", 5020)
    assert plc("plc-gw.local") == ("plc-gw.local", 4840)
    assert plc("[::1]:4840", default=1) == ("::1", 4840)
    for bad in ("nonsense:port", "host:0", "host:70000", "a b:1", "::1:4840", "host:", "[::1]x", "[::1]:", ":"):
        with pytest.raises(OutputError, match="--opcua") as err:
            plc(bad)
        assert "\n" not in str(err.value)
    assert parse_host_port("8080", "http") == ("127.0.0.1", 8080)
    assert parse_host_port("[::1]:0", "http") == ("::1", 0)
    for bad in ("plc-gw.local", "host:x", ""):
        with pytest.raises(ConfigError, match="^http: expected HOST:PORT"):
            parse_host_port(bad, "http")


def test_plc_status_counts_health_and_thresholds():
    plc = PlcStatus(max_result_age_s=0.3)
    v = plc.values()
    assert (v["decision"], v["decision_code"], v["score"], v["frame_id"], v["total"]) == ("", 0, None, None, 0)
    assert v["healthy"] is False and v["image_threshold"] is None and v["review_threshold"] is None
    results = mixed_results(200, seed=1)
    for r in results:
        plc.update(r)
    want = expected_counts(results)
    assert {k: plc.values()[k] for k in want} == want == plc.counts()
    assert 0 < want["ok"] and 0 < want["ng"] and 0 < want["review"]  # the mix covers every decision
    last = results[-1]
    v = plc.values()
    assert v["decision"] == last.decision.upper() and v["frame_id"] == last.index and v["score"] == last.score
    assert v["timestamp"] == last.result_time and v["healthy"] is True
    assert wait_for(lambda: not plc.values()["healthy"], 2.0)  # no result for longer than the limit
    plc.set_thresholds(Thresholds(pixel=0.1, image=2.0, review=1.5))
    assert (plc.values()["image_threshold"], plc.values()["review_threshold"]) == (2.0, 1.5)

    # With a pipeline status: running, source connected and a recent result are all needed.
    snap = {"running": True, "source_connected": True, "last_result_age_s": 0.0,
            "thresholds": {"image": 3.0, "pixel": 0.2}}
    plc = PlcStatus(lambda: dict(snap), initial_counts={"ok": 5, "ng": 2})
    assert plc.counts() == {"total": 7, "ok": 5, "ng": 2, "review": 0}
    assert plc.values()["healthy"] is False  # not polled yet
    plc.poll()
    v = plc.values()
    assert v["healthy"] is True and v["image_threshold"] == 3.0 and v["review_threshold"] is None
    snap["source_connected"] = False
    plc.beat()
    assert plc.values()["healthy"] is False and plc.values()["heartbeat"] == 1
    snap.update(source_connected=True, last_result_age_s=30.0)
    plc.beat()
    assert plc.values()["healthy"] is False
    plc.update(result(1, 0.1, "ok"))  # our own fresh result counts too
    assert plc.values()["healthy"] is True
    snap["running"] = False
    plc.poll()
    assert plc.values()["healthy"] is False

    for bad in ({"ok": -1}, {"ng": 1.5}, {"total": 1, "ok": 2}, {"ng_count": 3}):
        with pytest.raises(OutputError, match="initial PLC counts"):
            PlcStatus(initial_counts=bad)


def test_trigger_gate():
    gate, stop = TriggerGate(), threading.Event()
    assert gate.wait(stop, timeout=0.05) is False
    threading.Timer(0.05, gate.fire).start()
    t0 = time.monotonic()
    assert gate.wait(stop, timeout=5.0) is True
    assert time.monotonic() - t0 < 1.0
    for _ in range(3):
        gate.fire()
    assert gate.pending == 3
    assert [gate.wait(stop, timeout=0) for _ in range(4)] == [True, True, True, False]
    threading.Timer(0.05, stop.set).start()
    t0 = time.monotonic()
    assert gate.wait(stop) is False  # no timeout: only the stop event ends it
    assert time.monotonic() - t0 < 1.0
    gate.fire()
    assert gate.wait(stop, timeout=1.0) is False and gate.pending == 1  # stopped wins
    assert (gate.fired, gate.consumed) == (5, 4)


def test_missing_library_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "asyncua", None)
    monkeypatch.setitem(sys.modules, "pymodbus", None)
    with pytest.raises(OutputError, match=r"--opcua.*pip install asyncua") as err:
        OpcUaSink(":4840")
    assert "\n" not in str(err.value)
    with pytest.raises(OutputError, match=r"--modbus.*pip install pymodbus") as err:
        ModbusSink(":5020")
    assert "\n" not in str(err.value)


def test_bad_address_names_the_option():
    with pytest.raises(OutputError, match="--opcua"):
        OpcUaSink("nonsense:port")
    with pytest.raises(OutputError, match="--modbus"):
        ModbusSink("nonsense:port")


# --------------------------------------------------------------------------- OPC UA


def _ua_nodes(client, names):
    idx = client.get_namespace_index("urn:edgestad")
    root = client.nodes.root
    return idx, {n: root.get_child(["0:Objects", f"{idx}:edgestad", f"{idx}:{n}"]) for n in names}


UA_NAMES = ("Decision", "DecisionCode", "Score", "ImageThreshold", "ReviewThreshold", "FrameId", "Timestamp",
            "Total", "OkCount", "NgCount", "ReviewCount", "Heartbeat", "Healthy")


def test_opcua_publishes_decisions_counters_heartbeat_and_trigger():
    pytest.importorskip("asyncua", reason="asyncua not installed (pip install asyncua)")
    from asyncua import ua
    from asyncua.sync import Client

    port = free_port()
    gate = TriggerGate()
    sink = OpcUaSink(f"127.0.0.1:{port}", thresholds=Thresholds(pixel=0.5, image=1.0), on_trigger=gate.fire,
                     heartbeat_s=0.1).start()
    assert sink.url == f"opc.tcp://127.0.0.1:{port}/edgestad/"
    try:
        with Client(sink.url, timeout=5) as client:
            idx, n = _ua_nodes(client, UA_NAMES)

            def read():
                return {name: node.read_value() for name, node in n.items()}

            types = {name: node.read_data_type_as_variant_type() for name, node in n.items()}
            assert types == {
                "Decision": ua.VariantType.String, "DecisionCode": ua.VariantType.Int32,
                "Score": ua.VariantType.Double, "ImageThreshold": ua.VariantType.Double,
                "ReviewThreshold": ua.VariantType.Double, "FrameId": ua.VariantType.Int64,
                "Timestamp": ua.VariantType.DateTime, "Total": ua.VariantType.UInt64,
                "OkCount": ua.VariantType.UInt64, "NgCount": ua.VariantType.UInt64,
                "ReviewCount": ua.VariantType.UInt64, "Heartbeat": ua.VariantType.UInt32,
                "Healthy": ua.VariantType.Boolean}
            v = read()
            assert (v["Decision"], v["DecisionCode"], v["FrameId"], v["Total"], v["Healthy"]) == ("", 0, -1, 0, False)
            assert math.isnan(v["Score"]) and v["ImageThreshold"] == 1.0 and math.isnan(v["ReviewThreshold"])

            t0 = time.time() - 0.5
            sink.handle(result(7, 1.25, "ng", result_time=t0))
            assert wait_for(lambda: n["FrameId"].read_value() == 7, 1.0)
            v = read()
            assert (v["Decision"], v["DecisionCode"], v["Score"], v["NgCount"], v["Total"]) == ("NG", 3, 1.25, 1, 1)
            assert abs((v["Timestamp"] - datetime.fromtimestamp(t0, timezone.utc)).total_seconds()) < 1e-3
            assert v["Healthy"] is True

            sink.handle(result(8, 0.2, "ok"))
            assert wait_for(lambda: n["FrameId"].read_value() == 8, 1.0)
            v = read()
            assert (v["Decision"], v["DecisionCode"], v["Score"], v["OkCount"], v["Total"]) == ("OK", 1, 0.2, 1, 2)
            sink.handle(result(9, 0.9, "review"))
            assert wait_for(lambda: n["FrameId"].read_value() == 9, 1.0)
            v = read()
            assert (v["Decision"], v["DecisionCode"], v["ReviewCount"], v["NgCount"], v["OkCount"], v["Total"]) == (
                "REVIEW", 2, 1, 1, 1, 3)

            beat = n["Heartbeat"].read_value()
            assert wait_for(lambda: n["Heartbeat"].read_value() >= beat + 3, 2.0)

            sink.set_thresholds(Thresholds(pixel=0.5, image=2.0, review=1.5))
            assert wait_for(lambda: n["ReviewThreshold"].read_value() == 1.5, 1.0)
            assert n["ImageThreshold"].read_value() == 2.0

            obj = client.nodes.root.get_child(["0:Objects", f"{idx}:edgestad"])
            assert obj.call_method(f"{idx}:Trigger") is None
            assert gate.pending == 1 and sink.triggers == 1
            assert gate.wait(threading.Event(), timeout=0) is True

            with pytest.raises(ua.UaStatusCodeError):  # read-only for clients
                n["Decision"].write_value(ua.Variant("OK", ua.VariantType.String))
            assert n["Decision"].read_value() == "REVIEW"
    finally:
        sink.close()
    sink.close()  # idempotent
    with listening_socket(port):  # the port is free again
        pass


def test_opcua_counts_after_many_results_and_restart_with_restored_counts():
    pytest.importorskip("asyncua", reason="asyncua not installed (pip install asyncua)")
    from asyncua.sync import Client

    port = free_port()
    restored = {"total": 110, "ok": 100, "ng": 7, "review": 3}
    results = mixed_results(200, seed=2)
    sink = OpcUaSink(f"127.0.0.1:{port}", initial_counts=restored, heartbeat_s=0.2).start()
    try:
        t0 = time.perf_counter()
        for r in results:
            sink.handle(r)
        handle_s = time.perf_counter() - t0
        want = expected_counts(results, restored)
        with Client(sink.url, timeout=5) as client:
            idx, n = _ua_nodes(client, ("Total", "OkCount", "NgCount", "ReviewCount", "FrameId", "Decision"))
            assert wait_for(lambda: n["FrameId"].read_value() == results[-1].index, 1.0)
            got = {k: n[name].read_value() for k, name in
                   (("total", "Total"), ("ok", "OkCount"), ("ng", "NgCount"), ("review", "ReviewCount"))}
            assert got == want
            assert n["Decision"].read_value() == results[-1].decision.upper()
            obj = client.nodes.root.get_child(["0:Objects", f"{idx}:edgestad"])
            with pytest.raises(Exception):  # no on_trigger: no Trigger method
                obj.get_child(f"{idx}:Trigger")
        counts = sink.plc.counts()
    finally:
        sink.close()
    assert counts == want
    assert handle_s < 0.5, f"200 handle() calls took {handle_s:.3f} s"

    # A restart on the same port (close() freed it) continues from the persisted counts.
    again = OpcUaSink(f"127.0.0.1:{port}", initial_counts=counts).start()
    try:
        with Client(again.url, timeout=5) as client:
            _, n = _ua_nodes(client, ("Total", "NgCount", "Decision"))
            assert (n["Total"].read_value(), n["NgCount"].read_value(), n["Decision"].read_value()) == (
                want["total"], want["ng"], "")
    finally:
        again.close()


def test_opcua_busy_port_is_one_line_error():
    pytest.importorskip("asyncua", reason="asyncua not installed (pip install asyncua)")
    port = free_port()
    with listening_socket(port):
        sink = OpcUaSink(f"127.0.0.1:{port}")
        with pytest.raises(OutputError, match=rf"--opcua: cannot serve OPC UA on 127.0.0.1:{port}: ") as err:
            sink.start()
    assert "\n" not in str(err.value)
    with pytest.raises(OutputError, match="heartbeat"):
        OpcUaSink(":4840", heartbeat_s=0)


# --------------------------------------------------------------------------- Modbus TCP


def _i32(hi: int, lo: int) -> int:
    n = (hi << 16) | lo
    return n - (1 << 32) if n & 0x80000000 else n


def _u32(hi: int, lo: int) -> int:
    return (hi << 16) | lo


def test_modbus_map_decisions_heartbeat_health_and_read_only():
    pytest.importorskip("pymodbus", reason="pymodbus not installed (pip install pymodbus)")
    from pymodbus.client import ModbusTcpClient

    port = free_port()
    snap = {"running": True, "source_connected": True, "last_result_age_s": None}
    sink = ModbusSink(f"127.0.0.1:{port}", status=lambda: dict(snap), thresholds=Thresholds(pixel=0.5, image=1.0),
                      heartbeat_s=0.1).start()
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    try:
        assert client.connect()

        def regs():
            rr = client.read_holding_registers(0, count=18, device_id=1)
            assert not rr.isError(), rr
            return rr.registers

        def coils():
            rr = client.read_coils(0, count=5, device_id=1)
            assert not rr.isError(), rr
            return rr.bits[:5]

        r = regs()
        assert r[12] == 0 and _i32(*r[0:2]) == NO_VALUE and _u32(*r[4:6]) == 0
        assert _i32(*r[14:16]) == 1000 and _i32(*r[16:18]) == NO_VALUE  # no REVIEW band: the sentinel
        assert coils()[:4] == [False, False, False, False]  # no part yet: not healthy

        sink.handle(result(70000, -0.25, "ng"))  # frame id above 16 bits, negative score
        assert wait_for(lambda: regs()[12] == 3, 1.0)
        r = regs()
        assert _i32(*r[0:2]) == -250 and r[0:2] == [0xFFFF, 0xFF06]
        assert client.convert_from_registers(r[0:2], client.DATATYPE.INT32) == -250  # the library's decoding
        assert _u32(*r[2:4]) == 70000 and _u32(*r[4:6]) == 1 and _u32(*r[8:10]) == 1
        assert coils()[:3] == [False, True, False]
        assert wait_for(lambda: coils()[3], 1.0)  # healthy after a result
        assert client.read_input_registers(0, count=18, device_id=1).registers == regs()
        assert client.read_discrete_inputs(0, count=5, device_id=1).bits[:3] == [False, True, False]

        sink.handle(result(70001, 0.5, "ok"))
        assert wait_for(lambda: regs()[12] == 1, 1.0)
        assert coils()[:3] == [True, False, False] and _i32(*regs()[0:2]) == 500
        sink.handle(result(70002, 0.8, "review"))
        assert wait_for(lambda: regs()[12] == 2, 1.0)
        r = regs()
        assert coils()[:3] == [False, False, True]
        assert [_u32(*r[i:i + 2]) for i in (4, 6, 8, 10)] == [3, 1, 1, 1]

        # heartbeat: the register counts up, the coil toggles
        first = regs()[13]
        assert wait_for(lambda: (regs()[13] - first) % 65536 >= 3, 2.0)
        seen = set()
        assert wait_for(lambda: seen.add(coils()[4]) or seen == {True, False}, 2.0)

        snap["source_connected"] = False  # the camera is gone: not healthy at the next heartbeat
        assert wait_for(lambda: not coils()[3], 1.0)
        snap["source_connected"] = True
        assert wait_for(lambda: coils()[3], 1.0)

        sink.set_thresholds(Thresholds(pixel=0.5, image=2.0, review=1.5))
        assert wait_for(lambda: _i32(*regs()[16:18]) == 1500, 1.0) and _i32(*regs()[14:16]) == 2000

        assert client.write_register(12, 1, device_id=1).isError()  # read-only
        assert client.write_coil(1, False, device_id=1).isError()
        assert regs()[12] == 2 and coils()[1] is False and coils()[2] is True
        assert client.read_holding_registers(18, count=1, device_id=1).isError()  # outside the map
    finally:
        client.close()
        sink.close()
    sink.close()
    with listening_socket(port):
        pass


def test_modbus_counts_after_many_results_and_restore():
    pytest.importorskip("pymodbus", reason="pymodbus not installed (pip install pymodbus)")
    from pymodbus.client import ModbusTcpClient

    port = free_port()
    restored = {"total": 65540, "ok": 65536, "ng": 3, "review": 1}  # above 16 bits: both words matter
    results = mixed_results(200, seed=3, start_index=500)
    sink = ModbusSink(f":{port}", initial_counts=restored).start()
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    try:
        assert client.connect()
        for r in results:
            sink.handle(r)
        want = expected_counts(results, restored)
        assert wait_for(lambda: _u32(*client.read_holding_registers(2, count=2).registers) == results[-1].index, 1.0)
        r = client.read_holding_registers(0, count=18, device_id=1).registers
        assert {k: _u32(*r[i:i + 2]) for k, i in (("total", 4), ("ok", 6), ("ng", 8), ("review", 10))} == want
        assert r[12] == {"ok": 1, "review": 2, "ng": 3}[results[-1].decision]
        assert _i32(*r[0:2]) == round(results[-1].score * 1000)
    finally:
        client.close()
        sink.close()


def test_modbus_busy_port_is_one_line_error():
    pytest.importorskip("pymodbus", reason="pymodbus not installed (pip install pymodbus)")
    port = free_port()
    with listening_socket(port):
        with pytest.raises(OutputError, match=rf"--modbus: cannot serve Modbus TCP on 127.0.0.1:{port}: ") as err:
            ModbusSink(f"127.0.0.1:{port}").start()
    assert "\n" not in str(err.value)
    with pytest.raises(OutputError, match="unit id"):
        ModbusSink(":5020", unit_id=300)
