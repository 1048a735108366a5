"""edgestad.runtime: the line-side camera runtime.

Frames from a camera, video, image folder, stream URL or GStreamer pipeline go through the exported
graph (TensorRT engine or ONNX Runtime) and come out as anomaly maps, OK/NG decisions, events,
saved NG frames, an MJPEG/JSON/Prometheus HTTP endpoint and systemd notifications.

This package never imports torch, directly or through other edgestad modules: it must install
on a Jetson with JetPack's Python, OpenCV and TensorRT alone (tests/test_runtime_no_torch.py
proves it). Keep heavy optional imports (tensorrt, pycuda, paho, prometheus_client) lazy.
"""
