"""torch.hub entry points, offline: nothing is ever downloaded.

    import torch
    model = torch.hub.load("path/to/this/repo", "custom", path="best.pt", source="local")
    results = model("image.jpg")       # a Detector (engine/detector.py) returning Results
    results.print()

    torch.hub.load(repo, "yolov5_fastvit", source="local")                          # untrained, 80 classes
    torch.hub.load(repo, "yolov5n", pretrained="runs/train/exp/weights/best.pt", source="local")

One entry point per model YAML in configs/models/ (dashes become underscores: yolov5-levit-256.yaml is
`yolov5_levit_256`). `pretrained` is a local checkpoint of that architecture (there are no weights to
download); `classes` sets the number of classes of an untrained model; `autoshape=False` returns the
bare DetectionModel (eval mode) instead of the Detector, as YOLOv5's hub does. Other keyword
arguments (conf, iou, classes ids via `keep_classes`, max_det, imgsz, device, half) go to the Detector.
"""

from __future__ import annotations

from pathlib import Path as _Path  # underscored: torch.hub.list() shows every public callable

dependencies = ["torch", "yaml", "cv2", "numpy"]
ARCHITECTURE_KEYS = ("backbone", "head", "depth_multiple", "width_multiple")  # what must match a YAML


def custom(path: str | _Path, autoshape: bool = True, device: str = "", **detector_options):
    """A trained model from a local file: .pt, .torchscript, .onnx or an _openvino_model/ folder."""
    if not autoshape:
        from engine.checkpoint import load_detection_model

        if _Path(path).suffix != ".pt":
            raise ValueError(f"autoshape=False returns the DetectionModel, which needs a .pt checkpoint; "
                             f"{path} is not one (leave autoshape=True to run it)")
        return load_detection_model(path, device or "cpu", fuse=False)
    from engine.detector import Detector

    return Detector(path, device=device, **_detector_options(detector_options))


def _detector_options(options: dict) -> dict:
    """hub-style keywords -> Detector keywords ('keep_classes' because 'classes' means nc here)."""
    options = dict(options)
    if "keep_classes" in options:
        options["classes"] = options.pop("keep_classes")
    return options


def _build(cfg: str, pretrained: str | _Path | None, classes: int, autoshape: bool, device: str,
           detector_options: dict):
    from engine.detector import Detector
    from models.yolo import DetectionModel, load_model_config

    if pretrained:
        _check_architecture(_Path(pretrained), cfg)
        return custom(pretrained, autoshape=autoshape, device=device, **detector_options)
    model = DetectionModel(load_model_config(cfg), nc=classes).eval()
    return Detector(model, device=device, **_detector_options(detector_options)) if autoshape else model


def _check_architecture(path: _Path, cfg: str) -> None:
    """A pretrained checkpoint must hold this entry point's architecture (its YAML without nc)."""
    from engine.checkpoint import load_checkpoint, plain_yaml
    from models.yolo import load_model_config

    if path.suffix != ".pt":
        raise ValueError(f"pretrained={path}: expected a .pt checkpoint (hub 'custom' runs exported files)")
    saved = plain_yaml(load_checkpoint(path)["yaml"])
    wanted = plain_yaml(load_model_config(cfg))
    if any(saved.get(k) != wanted.get(k) for k in ARCHITECTURE_KEYS):
        raise ValueError(f"pretrained={path} was trained from {saved.get('yaml_file', 'another YAML')}, not "
                         f"{cfg}; load it with torch.hub.load(repo, 'custom', path=..., source='local')")


def _entry(cfg: str):
    def entry(pretrained: str | _Path | None = None, classes: int = 80, autoshape: bool = True,
              device: str = "", **detector_options):
        return _build(cfg, pretrained, classes, autoshape, device, detector_options)

    entry.__name__ = cfg.removesuffix(".yaml").replace("-", "_")
    entry.__doc__ = f"{cfg}: untrained ({{classes}} classes) or from a local `pretrained` checkpoint."
    return entry


yolov5n = _entry("yolov5n.yaml")
yolov5s = _entry("yolov5s.yaml")
yolov5m = _entry("yolov5m.yaml")
yolov5l = _entry("yolov5l.yaml")
yolov5x = _entry("yolov5x.yaml")
yolov5_riformer = _entry("yolov5-riformer.yaml")
yolov5_riformer_s24 = _entry("yolov5-riformer-s24.yaml")
yolov5_riformer_m36 = _entry("yolov5-riformer-m36.yaml")
yolov5_efficientvit = _entry("yolov5-efficientvit.yaml")
yolov5_efficientvit_m0 = _entry("yolov5-efficientvit-m0.yaml")
yolov5_efficientvit_m5 = _entry("yolov5-efficientvit-m5.yaml")
yolov5_fastvit = _entry("yolov5-fastvit.yaml")
yolov5_fastvit_t8 = _entry("yolov5-fastvit-t8.yaml")
yolov5_fastvit_sa24 = _entry("yolov5-fastvit-sa24.yaml")
yolov5_fastvit_ma36 = _entry("yolov5-fastvit-ma36.yaml")
yolov5_mpvit = _entry("yolov5-mpvit.yaml")
yolov5_mpvit_xsmall = _entry("yolov5-mpvit-xsmall.yaml")
yolov5_mpvit_small = _entry("yolov5-mpvit-small.yaml")
yolov5_levit = _entry("yolov5-levit.yaml")
yolov5_levit_256 = _entry("yolov5-levit-256.yaml")
yolov5_levit_384 = _entry("yolov5-levit-384.yaml")
yolov5_timm_convnext = _entry("yolov5-timm-convnext.yaml")  # timm backbones (docs/bring-a-backbone.md)
yolov5_timm_pvt = _entry("yolov5-timm-pvt.yaml")
# the same architectures with the anchor-free decoupled head DetectAF (docs/heads.md)
yolov5n_af = _entry("yolov5n-af.yaml")
yolov5s_af = _entry("yolov5s-af.yaml")
yolov5_riformer_af = _entry("yolov5-riformer-af.yaml")
yolov5_efficientvit_af = _entry("yolov5-efficientvit-af.yaml")
yolov5_fastvit_af = _entry("yolov5-fastvit-af.yaml")
yolov5_mpvit_af = _entry("yolov5-mpvit-af.yaml")
yolov5_levit_af = _entry("yolov5-levit-af.yaml")
