"""TorchScript (`.torchscript`): a traced model with its metadata as the extra file config.txt (JSON)."""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.formats.base import (
    Capabilities,
    Format,
    RunOptions,
    WriteOptions,
    fixed_shape_from_metadata,
    names_from_metadata,
    precision_of,
    stride_from_metadata,
)

METADATA_FILE = "config.txt"  # name of the TorchScript extra file holding the JSON metadata


@contextlib.contextmanager
def quiet_tracing():
    """Silence the tracer's and the deprecated exporters' warnings; verification is the real check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored as `extra/config.txt` in a TorchScript archive ({} when absent).

    Read straight from the zip archive, so checking a file never deserialises its code.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
            if not names:
                return {}
            text = archive.read(names[0]).decode("utf-8")
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a TorchScript archive ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: extra/{METADATA_FILE} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: extra/{METADATA_FILE} must hold a JSON object, "
                         f"found {type(data).__name__}")
    return data


class TorchScriptRunner:
    """A TorchScript file written by export.py (or any traced model with the same output)."""

    def __init__(self, path: Path, device: torch.device, fp16: bool):
        meta = read_torchscript_metadata(path)
        with warnings.catch_warnings():  # torch.jit is deprecated upstream; the file format still works
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
        self.model = (model.half() if fp16 else model.float()).eval()
        self.stride = stride_from_metadata(meta, path)
        self.names = names_from_metadata(meta, meta.get("nc"), path)
        self.dynamic = bool(meta.get("dynamic", False))
        self.fixed_shape = None if self.dynamic else fixed_shape_from_metadata(meta, path)
        self.fp16 = fp16
        self.input_dtype = torch.float16 if fp16 else torch.float32
        self.precision = "fp16" if fp16 else precision_of(meta, fp16)

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        out = self.model(im)
        return out[0] if isinstance(out, (tuple, list)) else out


class TorchScriptFormat(Format):
    name, suffix = "torchscript", ".torchscript"
    capabilities = Capabilities(dynamic=True, bf16=False, int8=False, batch=True, torch_threads=True)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        return read_torchscript_metadata(path)

    def write(self, model, sample: torch.Tensor, tmp: Path, meta: dict[str, Any],
              options: WriteOptions) -> None:
        """Trace the model on `sample` and save it with the metadata as extra/config.txt (JSON)."""
        with quiet_tracing():
            # check_trace=False: the tracer's own re-run is redundant with the exporter's verification
            traced = torch.jit.trace(model, sample, strict=False, check_trace=False)
        traced.save(str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})

    def runner(self, path: Path, device: torch.device, options: RunOptions) -> TorchScriptRunner:
        return TorchScriptRunner(path, device, options.fp16)


FORMAT = TorchScriptFormat()
