"""The bench report: its schema, throughput ratios (ours vs peers, fused vs unfused) and the table."""
from __future__ import annotations

SCHEMA = "edgestad-bench/1"


def compare(models: list[dict]) -> dict:
    """Throughput ratios: ours vs each peer, fused vs unfused, per backend and batch."""
    def fps(entry, backend, batch):
        for r in entry["results"]:
            if r["backend"] == backend and r["batch"] == batch and r["status"] == "ok":
                return r["throughput_fps"]
        return None

    out: dict = {}
    ours = [m for m in models if m["method"] != "peer"]
    peers = [m for m in models if m["method"] == "peer"]
    keys = sorted({(r["backend"], r["batch"]) for m in models for r in m["results"]})
    for mine in ours:
        for peer in peers:
            ratios = {}
            for backend, batch in keys:
                a, b = fps(mine, backend, batch), fps(peer, backend, batch)
                if a and b:
                    ratios[f"{backend}@{batch}"] = round(a / b, 3)
            out[f"{mine['name']}/{peer['name']}"] = ratios
    unfused = [m for m in ours if not m["fused"]]
    fused = [m for m in ours if m["fused"]]
    if unfused and fused:
        ratios = {}
        for backend, batch in keys:
            a, b = fps(fused[0], backend, batch), fps(unfused[0], backend, batch)
            if a and b:
                ratios[f"{backend}@{batch}"] = round(a / b, 3)
        # The design target: fused ONNX (fp32, CPU) vs unfused torch eager.
        for batch in sorted({b for _, b in keys}):
            a, b = fps(fused[0], "ort-fp32", batch), fps(unfused[0], "torch", batch)
            if a and b:
                ratios[f"fused ort-fp32 / unfused torch @{batch}"] = round(a / b, 3)
        out["fused/unfused"] = ratios
    return out


def markdown_table(report: dict) -> str:
    lines = ["| model | GFLOP/frame | backend | batch | p50 ms | p99 ms | frames/s | n | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for m in report["models"]:
        for r in m["results"]:
            if r["status"] == "ok":
                lat = r["latency_ms"]
                cells = [f"{lat['p50']:.1f}", f"{lat['p99']:.1f}", f"{r['throughput_fps']:.2f}",
                         str(r["iterations"]), ""]
            else:
                cells = ["", "", "", "", f"{r['status']}: {r.get('note', '')}"]
            lines.append("| " + " | ".join([m["name"], f"{m['gflop_per_frame']:.1f}",
                                            r["backend"], str(r["batch"]), *cells]) + " |")
    return "\n".join(lines)
