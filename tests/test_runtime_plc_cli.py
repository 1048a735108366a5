"""`edgestad run ... --opcua --modbus --trigger opcua` as a real process: the PLC triggers each
inspection over OPC UA, and both servers' counters equal the events log the runtime wrote."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import free_port, wait_for
from test_runtime_toy import make_toy_bundle, write_folder

pytest.importorskip("asyncua", reason="asyncua not installed (pip install asyncua)")
pytest.importorskip("pymodbus", reason="pymodbus not installed (pip install pymodbus)")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def decided(events_file):
    if not events_file.exists():
        return []
    return [e for e in map(json.loads, events_file.read_text().splitlines()) if e["event"] in ("ok", "ng", "review")]


def test_plc_triggers_inspections_and_reads_counters_equal_to_the_events_log(tmp_path):
    from asyncua.sync import Client
    from pymodbus.client import ModbusTcpClient

    bundle = make_toy_bundle(tmp_path / "bundle", 48, 64)
    frames = write_folder(tmp_path / "frames", 6, spot_every=2)    # frames 0, 2, 4 are NG
    ua_port, mb_port = free_port(), free_port()
    events = tmp_path / "events"
    proc = subprocess.Popen([sys.executable, "-m", "edgestad.runtime.cli", "run", str(bundle), "--folder", str(frames),
                             "--opcua", f"127.0.0.1:{ua_port}", "--modbus", f"127.0.0.1:{mb_port}",
                             "--trigger", "opcua", "--events", str(events), "--events-all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the server listens (a plain socket: an asyncua Client that fails to connect
        # leaves its own non-daemon event-loop thread running, which keeps pytest from exiting)
        assert wait_for(lambda: proc.poll() is not None or _listening(ua_port), 30), "no OPC UA server"
        assert proc.poll() is None, proc.stderr.read()
        client = Client(f"opc.tcp://127.0.0.1:{ua_port}/edgestad/", timeout=5)
        client.connect()
        try:
            idx = client.get_namespace_index("urn:edgestad")
            obj = client.nodes.root.get_child(["0:Objects", f"{idx}:edgestad"])
            node = lambda n: obj.get_child(f"{idx}:{n}")  # noqa: E731
            time.sleep(1.0)
            assert decided(events / "events.jsonl") == []      # nothing inspected without a trigger
            for n in range(1, 5):
                obj.call_method(f"{idx}:Trigger")
                assert wait_for(lambda: len(decided(events / "events.jsonl")) == n, 10)
                assert wait_for(lambda: node("Total").read_value() == n, 5)
            log = decided(events / "events.jsonl")
            assert [e["decision"] for e in log] == ["NG", "OK", "NG", "OK"]
            assert node("NgCount").read_value() == 2 and node("OkCount").read_value() == 2
            assert node("Decision").read_value() == "OK" and node("FrameId").read_value() == log[-1]["frame"]
            assert wait_for(lambda: node("Healthy").read_value() is True, 5)   # polled each second
        finally:
            client.disconnect()
        mb = ModbusTcpClient("127.0.0.1", port=mb_port, timeout=2)
        assert mb.connect()
        try:
            regs = mb.read_holding_registers(0, count=18, device_id=1).registers
            total, ok, ng = (regs[4] << 16) | regs[5], (regs[6] << 16) | regs[7], (regs[8] << 16) | regs[9]
            assert (total, ok, ng) == (4, 2, 2)
        finally:
            mb.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    stop = [json.loads(line) for line in (events / "events.jsonl").read_text().splitlines()][-1]
    assert stop["event"] == "stop" and stop["counts"]["all"]["total"] == 4
