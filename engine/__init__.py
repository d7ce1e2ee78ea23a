"""What runs a model: the trainer (with callbacks), the validator, the predictor, the exporter, the
inference backends (PyTorch, TorchScript, ONNX Runtime, OpenVINO), checkpoint I/O and the Python API.

    from engine import Detector
    results = Detector("best.pt")("image.jpg")

engine/ may import models/, data/ and utils/; the command-line scripts are thin front ends over it.
"""

__all__ = ["Detector", "Results"]


def __getattr__(name: str):
    """`from engine import Detector` without importing the whole engine for `import engine.checkpoint`."""
    if name == "Detector":
        from engine.detector import Detector

        return Detector
    if name == "Results":
        from engine.results import Results

        return Results
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
