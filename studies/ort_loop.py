"""Run one ONNX graph N times at batch 1 on the CPU (ONNX Runtime, 2 threads): a whole-process
cross-check of `edgestad bench` with the operating system's own timing, e.g.

    edgestad bench -p 65 --dense-stride 4 --width 64 --peer efficientad-s --backends ort-fp32 \
        --batch 1 --onnx-dir graphs
    /usr/bin/time -v python studies/ort_loop.py graphs/<model>.onnx 40
"""
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).integers(0, 256, (1, 3, 256, 256), dtype=np.uint8)
for _ in range(int(sys.argv[2])):
    s.run(None, {"images": x})
