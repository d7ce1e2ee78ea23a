"""What runs a model: the trainer (with callbacks), the validator, the predictor, the exporter, the
inference backends (PyTorch, TorchScript, ONNX Runtime, OpenVINO) and checkpoint I/O.

engine/ may import models/, data/ and utils/; the command-line scripts are thin front ends over it.
"""
