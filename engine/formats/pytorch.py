"""Our own checkpoints (`.pt`): the source of every export, run eagerly as a DetectionModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.formats.base import Capabilities, Format, RunOptions


class PyTorchRunner:
    """A DetectionModel (a checkpoint's EMA weights when present, or a model in memory), optionally under
    bf16 autocast with the Detect head kept in float32."""

    precision = "fp32"

    def __init__(self, model: torch.nn.Module, device: torch.device, fp16: bool = False, bf16: bool = False):
        self.model = model.half() if fp16 else model.float()
        detect = self.model.model[-1]
        self.strides = [int(s) for s in detect.stride]
        self.anchors_per_cell = int(getattr(detect, "na", 1))
        self.stride = int(max(self.strides))
        self.names = [str(n) for n in self.model.names]
        self.dynamic, self.fixed_shape, self.fp16, self.bf16 = True, None, fp16, bf16
        self.input_dtype = torch.float16 if fp16 else torch.float32
        self.precision = "bf16" if bf16 else ("fp16" if fp16 else "fp32")
        self.device_type = device.type
        if bf16:
            keep_float32(detect, device.type)

    @classmethod
    def load(cls, path: Path, device: torch.device, options: RunOptions) -> PyTorchRunner:
        from engine.checkpoint import load_detection_model

        model = load_detection_model(path, device, fuse=False)
        if options.fuse:
            with torch.no_grad():  # folding must not record autograd history into the new weights
                model.fuse()
        return cls(model, device, options.fp16, options.bf16)

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(im)
        return out[0] if isinstance(out, (tuple, list)) else out


def keep_float32(module: torch.nn.Module, device_type: str) -> None:
    """Run `module` (the Detect head) in float32 inside a bf16 autocast region: its 1x1 output convs
    and the box decoding (pixel coordinates up to the image size; bf16 would round 600 px to 4 px)."""
    forward = module.forward

    def float_forward(x):
        with torch.autocast(device_type, enabled=False):
            return forward([t.float() for t in x])

    module.forward = float_forward


class PyTorchFormat(Format):
    name, suffix = "pytorch", ".pt"
    capabilities = Capabilities(dynamic=True, bf16=True, int8=False, batch=True, augment=True, ensemble=True,
                                exportable=False, lazy_init=False, torch_threads=True)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        """A checkpoint's stride and class names (loading it, weights only)."""
        from engine.checkpoint import load_detection_model

        model = load_detection_model(path, torch.device("cpu"), fuse=False)
        return {"stride": int(max(model.stride)), "names": [str(n) for n in model.names], "nc": int(model.nc)}

    def runner(self, path: Path, device: torch.device, options: RunOptions) -> PyTorchRunner:
        return PyTorchRunner.load(path, device, options)


FORMAT = PyTorchFormat()
