"""NNCF post-training INT8 quantisation of an OpenVINO IR (export.py --include openvino --int8).

    from engine.quantize_openvino import quantize_openvino_ir
    settings = quantize_openvino_ir("best_openvino_model/best.xml", "tmp/best_int8.xml", batches,
                                    head_prefix="/model.24/")

Settings and why:
- nncf.quantize on the float ov.Model itself (not a QDQ ONNX file converted afterwards): NNCF places
  its FakeQuantize nodes where OpenVINO's CPU plugin fuses them into int8 kernels, so the whole body
  (convolutions, SiLU, residual adds, concatenations, pooling, upsampling) runs in int8 end to end.
- Calibration: letterboxed train images, exactly as the ONNX Runtime path uses them
  (engine.quantize.calibration_batches: `letterbox(..., auto=False)` to the export's height x width).
- Kept in float (nncf.IgnoredScope): the Detect head's output convolutions and its decoding, i.e. every
  node of the head (`head_prefix`) from which no other head conv is reachable: the convs whose outputs
  are the logits and box regressions (8-bit steps there cost box precision, as in the ONNX Runtime
  path, which keeps the whole head float), the sigmoid, the grid/anchor arithmetic (pixel coordinates
  up to the image size) and the reshapes/concatenation. An anchor-free head's branch convs before
  its output convs are quantised (they are a large share of its cost). Measured on yolov5s (BCCD, 87
  val images, float 0.2662 at 640x640 and 0.2578 at 480x640): output convs quantised 0.2551 / 0.2452,
  float 0.2566 / 0.2498 together with the full bias correction below.
- Bias correction: NNCF's full algorithm (`fast_bias_correction=False`), slower to quantise (about 1.4x
  the calibration time) and the more accurate one: on the static 480x640 yolov5s IR alone 0.2452 ->
  0.2473.
- preset 'mixed' (symmetric weights, asymmetric activations: SiLU and GELU outputs are one-sided) or
  'performance' (symmetric both); see DEFAULT_PRESET.
- Accuracy control (`restore`, used by the exporter when the plain INT8 IR fails the --int8-tolerance
  gate): nncf.quantize_with_accuracy_control with our own val mAP50-95 as its metric. NNCF ranks the
  quantised layers by how far their int8 outputs move the model's outputs on a few val images, then
  returns them to float one group at a time, re-validating after each, until the drop is within
  `max_drop` (at most `max_reverted` groups: each costs a val pass).
- model_type: nncf.ModelType.TRANSFORMER when the graph has attention (a Softmax, or a MatMul of two
  activations: EfficientViT, FastViT-SA, LeViT, MPViT); it keeps the attention score and
  normalisation paths that lose accuracy at 8 bits in float and applies SmoothQuant to the linear
  layers. Convolutional graphs (yolov5*, RIFormer, FastViT-T) use NNCF's default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(f"vitdet.{__name__}")

PRESETS = ("mixed", "performance")
DEFAULT_PRESET = "mixed"
MODEL_TYPES = ("auto", "cnn", "transformer")
MAX_REVERTED_GROUPS = 8  # accuracy control: layer groups returned to float at most (one val pass each)
_DATA = ("Constant", "Parameter", "Result")  # never in the ignored scope: weights, inputs, outputs


def float_head_nodes(model, head_prefix: str) -> list[str]:
    """Friendly names of the head nodes NNCF leaves in float: every node under `head_prefix` from which
    no head Convolution is reachable (the output convs and the decoding after them), data nodes aside.
    What feeds a head conv (an anchor-free head's branch convs and their activations) is quantised."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_friendly_name().startswith(head_prefix) and op.get_type_name() not in _DATA
            and not _feeds_a_convolution(op, head_prefix)]


def _feeds_a_convolution(op, head_prefix: str) -> bool:
    """True when a Convolution under `head_prefix` is downstream of `op`."""
    seen, todo = set(), [op]
    while todo:
        node = todo.pop()
        for output in node.outputs():
            for target in output.get_target_inputs():
                child = target.get_node()
                name = child.get_friendly_name()
                if name in seen or not name.startswith(head_prefix):
                    continue
                if child.get_type_name() == "Convolution":
                    return True
                seen.add(name)
                todo.append(child)
    return False


def has_attention(model, head_prefix: str | None = None) -> bool:
    """True when the graph has a Softmax or a MatMul whose two inputs are both activations, outside the
    Detect head (`head_prefix`: an anchor-free head's distribution decoding has a Softmax of its own)."""
    for op in model.get_ordered_ops():
        if head_prefix and op.get_friendly_name().startswith(head_prefix):
            continue
        kind = op.get_type_name()
        if kind == "Softmax":
            return True
        if kind == "MatMul" and not any(_is_constant(op.input_value(i).get_node()) for i in range(2)):
            return True
    return False


def _is_constant(node) -> bool:
    """A Constant, possibly behind a Convert (weights stored in another precision)."""
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs its statistics collection at INFO; the exporter reports what matters itself."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class AccuracyRestore:
    """NNCF accuracy control's inputs: `validate(compiled_model) -> mAP50-95` (the gate's metric),
    `ranking_batches` (model inputs on which layers are ranked), the largest allowed absolute drop and
    how many layer groups may go back to float."""

    validate: Callable[[Any], float]
    ranking_batches: Sequence[np.ndarray]
    max_drop: float
    max_reverted: int = MAX_REVERTED_GROUPS


def nncf_settings(preset: str, transformer: bool, ignored: int, calibration_images: int) -> dict[str, Any]:
    """The settings as recorded in the INT8 IR's metadata.yaml (`int8`)."""
    return {"method": "nncf", "preset": preset, "model_type": "transformer" if transformer else "default",
            "head_nodes_in_float": ignored, "calibration_images": calibration_images}


def fake_quantize_count(model) -> int:
    """FakeQuantize nodes of an ov.Model: what NNCF quantised (accuracy control removes some)."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())


def quantize_openvino_ir(xml: str | Path, out_xml: str | Path, batches: Sequence[np.ndarray],
                         head_prefix: str, preset: str = DEFAULT_PRESET,
                         model_type: str = "auto", restore: AccuracyRestore | None = None) -> dict[str, Any]:
    """Quantise the IR `xml` with NNCF, calibrated on `batches` ((B, 3, H, W) float32 RGB in [0, 1], the
    IR's input), and save it as `out_xml` (+ .bin, weights not compressed to fp16). With `restore`,
    NNCF's accuracy control returns the layers that cost most accuracy to float. Returns the settings
    (nncf_settings, plus the FakeQuantize count and, with `restore`, 'accuracy_control')."""
    import nncf
    import openvino as ov

    if preset not in PRESETS:
        raise ValueError(f"--int8-preset {preset}: expected one of {', '.join(PRESETS)}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"NNCF model type {model_type}: expected one of {', '.join(MODEL_TYPES)}")
    model = ov.Core().read_model(str(xml))
    transformer = has_attention(model, head_prefix) if model_type == "auto" else model_type == "transformer"
    ignored = float_head_nodes(model, head_prefix)
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    common = dict(preset=presets[preset], model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                  subset_size=len(batches), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                  fast_bias_correction=False)
    with _quiet_nncf():
        if restore is None:
            quantised = nncf.quantize(model, nncf.Dataset(list(batches)), **common)
        else:
            quantised = _quantize_with_accuracy_control(nncf, model, batches, restore, common)
    ov.save_model(quantised, str(out_xml), compress_to_fp16=False)
    images = int(sum(len(b) for b in batches))
    LOGGER.info(f"INT8 (NNCF): quantised {Path(xml).name} (preset '{preset}', "
                f"{'transformer' if transformer else 'default'} model type) on {images} calibration images; "
                f"{len(ignored)} nodes of the Detect head (output convs and decoding) kept in float")
    settings = {**nncf_settings(preset, transformer, len(ignored), images),
                "fake_quantize_nodes": fake_quantize_count(quantised)}
    if restore is not None:
        settings["accuracy_control"] = {"max_drop": restore.max_drop, "max_reverted": restore.max_reverted}
    return settings


def _quantize_with_accuracy_control(nncf, model, batches, restore: AccuracyRestore, common: dict):
    """nncf.quantize_with_accuracy_control with our val mAP50-95 as the metric. validation_fn also returns
    the model's outputs on the items NNCF hands it: NNCF then ranks layers by how far they move those
    outputs (on `restore.ranking_batches`) instead of asking for a metric per image, which would cost a
    whole val pass per image and candidate."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    def validation_fn(compiled_model, items) -> tuple[float, list]:
        outputs = [list(compiled_model(item).values()) for item in items]
        return float(restore.validate(compiled_model)), outputs

    ranking = list(restore.ranking_batches)
    params = AdvancedAccuracyRestorerParameters(max_num_iterations=restore.max_reverted,
                                                ranking_subset_size=len(ranking))
    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(list(batches)), nncf.Dataset(ranking), validation_fn, max_drop=restore.max_drop,
        drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=params, **common)
