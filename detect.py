"""Run a detector on images, videos, webcams and streams; save annotated media, labels, crops, a CSV.

    python detect.py --weights best.pt --source path/to/images/          # folder
    python detect.py --weights best.onnx --source clip.mp4 --save-txt     # video, exported model
    python detect.py --weights best.pt --source 0                         # webcam
    python detect.py --weights best.pt --source 'rtsp://host/stream'      # stream

--source takes an image, a folder, a glob, a .txt list of files, a video, a webcam index, an
rtsp/rtmp/http(s) URL (read as a stream) or a .streams file listing several. Results go to
runs/detect/exp, exp2, ...: annotated images (same name), annotated videos (<stem>.mp4, 'mp4v', the
source's fps and frame size; with --vid-stride N only every N-th frame is written, at the source fps
as YOLOv5 does), labels/<stem>.txt (labels/<stem>_<frame>.txt for video frames; one line per box:
class x_centre y_centre width height, normalised to [0, 1], then conf with --save-conf),
crops/<class name>/<stem>.jpg and predictions.csv (image, frame, class_id, class_name, confidence,
x1, y1, x2, y2 in pixels of the original image).
"""

from __future__ import annotations

import argparse
import logging

from engine.cli import traceback_requested
from engine.predictor import run
from models.backbones.plugins import load_plugins
from utils.allocator import keep_freed_memory

LOGGER = logging.getLogger(f"vitdet.{__name__}")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                        help="Python file(s) that register backbones (docs/bring-a-backbone.md)")
    parser.add_argument("--weights", nargs="+", required=True,
                        help="model: .pt checkpoint, .torchscript or .onnx; several .pt files run as an ensemble")
    parser.add_argument("--source", type=str, required=True,
                        help="file, folder, glob, .txt list, video, webcam index, URL or .streams list")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640],
                        help="inference size: one value or height width")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results")
    parser.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    parser.add_argument("--save-conf", action="store_true", help="add confidences to --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped boxes to crops/<class>/")
    parser.add_argument("--save-csv", action="store_true", help="save results to predictions.csv")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class ids: --classes 0 2")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (.pt weights only)")
    parser.add_argument("--project", default="runs/detect", help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name folder")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="draw boxes without labels")
    parser.add_argument("--hide-conf", action="store_true", help="draw labels without confidences")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast of a .pt model (CPUs with native bf16: AVX-512 BF16 or AMX)")
    parser.add_argument("--vid-stride", type=int, default=1, help="use every n-th video frame")
    parser.add_argument("--profile", action="store_true",
                        help="log one line of per-frame stage times (read, wait, pre-process, inference, "
                             "NMS, draw/write) and the wall time at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_opt(argv)
    load_plugins(vars(opt).pop("plugin"))
    keep_freed_memory()  # steady eager inference speed (utils/allocator.py)
    opt.weights = opt.weights[0] if len(opt.weights) == 1 else opt.weights
    try:
        run(**vars(opt))
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        if traceback_requested():  # --verbose / VITDET_TRACEBACK=1 (engine/cli.py)
            raise
        LOGGER.error(f"detect.py: {err}")
        return 1
    return 0


if __name__ == "__main__":
    from engine.cli import run_cli

    run_cli(main)  # user errors: one message, exit 1 (--verbose: traceback)
