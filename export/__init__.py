"""edgestad.export: bundle -> ONNX graphs per precision (+ TensorRT engines), with parity checks.

One graph per precision holds the whole method (normalisation, teacher, students, all scales,
e/v, score normalisation, fusion, upsampling): input ``images`` uint8 N x 3 x H x W RGB 0..255,
(+ ``valid_box`` float32 N x 4 for letterbox bundles), outputs ``anomaly_map`` float32
N x 1 x H x W and ``image_score`` float32 N. Every graph and engine is run by edgestad.runner.

Modules, in the order export uses them:

- ``graph``: the I/O contract, metadata, opset handling, clean-up (onnx only, no torch);
- ``onnx_export``: torch module -> fp32 graph (torch's dynamo exporter);
- ``precision``: fp16 graph (conv networks fp16, scoring fp32) and int8 Q/DQ graph;
- ``calibration``: good training images / test set located through the bundle's provenance;
- ``trt_compat``: static TensorRT-compatibility check (operators.md allowlist, checker, shapes);
- ``parity``: ONNX Runtime CPU parity against torch and accuracy cost on the test set;
- ``tensorrt_build``: strongly typed TensorRT engines (a profile for every graph input, verified
  through TrtRunner against ONNX Runtime), their names and JSON sidecars;
- ``exporter``: ``export_bundle`` tying it together; ``cli``: the ``edgestad export`` command.

Nothing heavy is imported here: ``edgestad export`` must start on a device without torch.
"""
