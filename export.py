"""Export a trained checkpoint to TorchScript / ONNX (/ OpenVINO) and verify each export.

    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx
    python export.py --weights best.pt --include onnx --dynamic --simplify

Exports the fused/reparameterised model next to the weights (best.torchscript, best.onnx,
best_openvino_model/), with stride and class names in the file's metadata. Every export is run on a
sample input and compared with the PyTorch output; a relative difference above 1e-3 is a failure and
the command exits with status 1. A previous export of the same weights is replaced (as YOLOv5 does);
any other existing file of that name is never overwritten. Library code: engine/exporter.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.exporter import DEFAULT_OPSET, FORMATS, ExportError, export_model

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, required=True, help="checkpoint (.pt) to export")
    parser.add_argument("--include", nargs="+", default=["torchscript", "onnx"],
                        help=f"formats: {', '.join(FORMATS)} (openvino needs the openvino package)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640],
                        help="input size: one value or height width")
    parser.add_argument("--batch-size", type=int, default=1, help="exported batch size")
    parser.add_argument("--dynamic", action="store_true", help="ONNX/TorchScript: any batch and input size")
    parser.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim when installed")
    parser.add_argument("--half", action="store_true", help="float16 export (CUDA devices only)")
    parser.add_argument("--device", default="cpu", help="cpu or a CUDA index such as 0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_opt(argv)
    try:
        files = export_model(opt.weights, include=opt.include, imgsz=opt.imgsz, batch_size=opt.batch_size,
                             dynamic=opt.dynamic, opset=opt.opset, simplify=opt.simplify, half=opt.half,
                             device=opt.device)
    except (ExportError, FileExistsError, FileNotFoundError, ValueError) as err:
        LOGGER.error(f"export failed: {err}")
        return 1
    LOGGER.info("Export complete: " + ", ".join(str(path) for path in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
