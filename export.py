"""Export a trained checkpoint to TorchScript / ONNX (/ OpenVINO) and verify each export.

    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx
    python export.py --weights best.pt --include onnx --dynamic --simplify
    python export.py --weights best.pt --include onnx --int8 --data bccd.yaml --calib 100
    python export.py --weights best.pt --include openvino
    python export.py --weights best.pt --include openvino --int8 --data bccd.yaml   # NNCF INT8 IR
    python export.py --weights best.pt --include onnx --imgsz 480 640 --int8 --data bccd.yaml  # 640x480
    python export.py --weights best.pt --int8 --data bccd.yaml  # every INT8 flavour; names the fastest

Exports the fused/reparameterised model next to the weights (best.torchscript, best.onnx,
best_openvino_model/), with stride and class names in the file's metadata. Every export is run on a
sample input and compared with the PyTorch output; a relative difference above 1e-3 is a failure and
the command exits with status 1. A previous export of the same weights is replaced (as YOLOv5 does);
any other existing file of that name is never overwritten. Library code: engine/exporter.py.

--int8 also writes best_int8.onnx: static INT8 (QDQ) quantisation of the ONNX export with onnxruntime,
calibrated on --calib images of the --data train split (letterboxed as detect.py does). Both the float
and the INT8 ONNX model are validated on the val split; a mAP50-95 drop above --int8-tolerance fails
the export (exit status 1, no INT8 file). --int8-ops picks what is quantised: 'full' (the convs and the
ops between them: the fastest), 'conv' (convs and linear layers only), or 'auto' (default: 'full', and
'conv' when 'full' fails the tolerance). detect.py / val.py run best_int8.onnx like any ONNX file, and
best_openvino_model/ like any other weights (--bf16 runs it in OpenVINO's bf16 precision).
--include openvino --int8 writes best_int8_openvino_model/: by default (--openvino-int8 nncf) NNCF
post-training quantisation of the float IR (calibrated on the same letterboxed train images, the Detect
head's output convs and box decoding kept in float, NNCF's full bias correction, its transformer model
type for backbones with attention), gated against the float IR's val mAP50-95; --openvino-int8 qdq
instead converts the accepted best_int8.onnx (needs onnx in --include). The exporter prints which one
it wrote.
--int8 without --include exports onnx and openvino (when installed) with both INT8 models; a flavour the
gate refuses is reported and skipped (the export fails only when every flavour is refused), and the
accepted INT8 files are timed on this machine and the fastest is named with the detect.py command to
run it (which runtime wins depends on the model and the CPU: docs/deployment.md).
--imgsz H W exports a static H x W (e.g. 480 640 for a 640x480 camera); val.py then letterboxes every
image to exactly H x W, and detect.py feeds it frames letterboxed to that shape.
"""

from __future__ import annotations

import argparse
import logging

from engine.cli import traceback_requested
from engine.exporter import (
    DEFAULT_INCLUDE,
    DEFAULT_OPENVINO_INT8,
    DEFAULT_OPSET,
    FORMATS,
    INT8_OPS,
    OPENVINO_INT8_METHODS,
    ExportError,
    ExportOptions,
    export_and_verify,
)
from engine.quantize import DEFAULT_CALIB_IMAGES, DEFAULT_INT8_TOLERANCE
from engine.quantize_openvino import DEFAULT_PRESET, PRESETS
from models.backbones.plugins import load_plugins

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, required=True, help="checkpoint (.pt) to export")
    parser.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                        help="Python file(s) that register backbones (docs/bring-a-backbone.md)")
    parser.add_argument("--include", nargs="+", default=None,
                        help=f"formats: {', '.join(FORMATS)} (openvino needs the openvino package); "
                             f"default {' '.join(DEFAULT_INCLUDE)}, with --int8 every INT8 format installed")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640],
                        help="input size: one value or height width")
    parser.add_argument("--batch-size", type=int, default=1, help="exported batch size")
    parser.add_argument("--dynamic", action="store_true", help="ONNX/TorchScript: any batch and input size")
    parser.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim when installed")
    parser.add_argument("--half", action="store_true", help="float16 export (CUDA devices only)")
    parser.add_argument("--device", default="cpu", help="cpu or a CUDA index such as 0")
    parser.add_argument("--int8", action="store_true",
                        help="also write INT8 models: <stem>_int8.onnx (with onnx) and "
                             "<stem>_int8_openvino_model/ (with openvino); needs --data")
    parser.add_argument("--data", default="", help="--int8: dataset YAML (train: calibration, val: check)")
    parser.add_argument("--calib", type=int, default=DEFAULT_CALIB_IMAGES,
                        help="--int8: number of calibration images from the train split (all if fewer)")
    parser.add_argument("--int8-ops", choices=INT8_OPS, default="auto",
                        help="--int8: 'full' quantises convs and the ops between them (fastest), 'conv' "
                             "only convs/linear layers; 'auto': 'full', or 'conv' if 'full' fails")
    parser.add_argument("--int8-tolerance", type=float, default=DEFAULT_INT8_TOLERANCE,
                        help="--int8: largest allowed mAP50-95 drop (absolute) versus the float model")
    parser.add_argument("--openvino-int8", choices=OPENVINO_INT8_METHODS, default=DEFAULT_OPENVINO_INT8,
                        help="--int8 with openvino: 'nncf' quantises the float IR with NNCF (default), "
                             "'qdq' converts the INT8 ONNX file (needs onnx in --include)")
    parser.add_argument("--int8-preset", choices=PRESETS, default=DEFAULT_PRESET,
                        help="--int8 --openvino-int8 nncf: NNCF preset (mixed: asymmetric activations)")
    return parser.parse_args(argv)


def export_options(opt: argparse.Namespace) -> ExportOptions:
    """export.py's flags as the exporter's options."""
    return ExportOptions(include=opt.include, imgsz=opt.imgsz, batch_size=opt.batch_size, dynamic=opt.dynamic,
                         opset=opt.opset, simplify=opt.simplify, half=opt.half, device=opt.device,
                         int8=opt.int8, data=opt.data or None, calib=opt.calib,
                         int8_tolerance=opt.int8_tolerance, int8_ops=opt.int8_ops,
                         openvino_int8=opt.openvino_int8, int8_preset=opt.int8_preset)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_opt(argv)
    load_plugins(vars(opt).pop("plugin"))
    try:
        results = export_and_verify(opt.weights, export_options(opt))
    except (ExportError, FileExistsError, FileNotFoundError, ValueError) as err:
        if traceback_requested():  # --verbose / VITDET_TRACEBACK=1 (engine/cli.py)
            raise
        LOGGER.error(f"export failed: {err}")
        return 1
    for fmt, runtime in (("onnx_int8", "ONNX Runtime"), ("openvino_int8", "OpenVINO")):
        if fmt in results:
            m = results[fmt].metrics
            timing = (f"; {m['latency_ms']:.1f} ms here{', the fastest' if m.get('fastest') else ''}"
                      if "latency_ms" in m else "")
            LOGGER.info(f"INT8 in {runtime} ({m['method']}, ops '{m['ops']}'): val mAP50-95 "
                        f"{m['map_int8']:.4f} (float {m['map_float']:.4f}, drop {m['drop']:+.4f}, "
                        f"tolerance {opt.int8_tolerance:g}){timing}")
    LOGGER.info("Export complete: " + ", ".join(str(r.path) for r in results.values()))
    return 0


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)  # user errors: one message, exit 1 (--verbose: traceback)
