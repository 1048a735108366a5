"""`edgestad bench` and the EfficientAD-S peer it is timed against: outside the core package
(it imports export/ to make graphs), installed as ``edgestad.bench``.

cli.py the command; subjects.py the models timed; graphs.py the ONNX graphs (export, fp16, int8);
flops.py GFLOP counting; backends.py what each backend runs; timing.py round-robin timing;
run.py the harness; report.py the report's comparisons and table; efficientad.py the peer."""
