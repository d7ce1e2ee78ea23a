"""Several --weights: an ensemble (YOLOv5's Ensemble: the models' rows side by side, NMS merges them)."""

from __future__ import annotations

import pytest
import torch

from engine.backend import InferenceBackend
from engine.checkpoint import checkpoint_dict, save_checkpoint
from engine.evaluation import EvalOptions, evaluate
from models.yolo import DetectionModel
from utils.nms import non_max_suppression


def _checkpoint(path, names, seed):
    torch.manual_seed(seed)
    model = DetectionModel("yolov5n.yaml", nc=len(names))
    model.names = list(names)
    with torch.no_grad():  # random norms: scores that differ box to box (an untrained model ties them)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1, 0.5)
                module.bias.normal_(0, 0.5)
        for conv in model.model[-1].m:
            conv.bias.view(model.model[-1].na, -1)[:, 4] = 1.0
    return save_checkpoint(checkpoint_dict(model), path)


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    for column in reversed(range(rows.shape[1])):  # stable sorts from the last key to the first
        rows = rows[rows[:, column].argsort(stable=True)]
    return rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    names = ["circle", "square", "triangle", "cross", "ring", "diamond"]
    return (_checkpoint(folder / "a.pt", names, 0), _checkpoint(folder / "b.pt", names, 1),
            _checkpoint(folder / "other.pt", ["x", "y"], 2))


def test_ensemble_concatenates_the_models_rows(checkpoints):
    a, b, _ = checkpoints
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    alone_a, alone_b = InferenceBackend(a)(x), InferenceBackend(b)(x)
    both = InferenceBackend([a, b])(x)
    assert torch.equal(both, torch.cat([alone_a, alone_b], 1))


def test_an_ensemble_of_a_checkpoint_with_itself_equals_the_checkpoint(checkpoints):
    a = checkpoints[0]
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    # IoU 0.999: copies (IoU 1) merge, distinct boxes never do, so ties in score cannot reorder the result
    single = non_max_suppression(InferenceBackend(a)(x), 0.02, 0.999, max_det=10000)
    double = non_max_suppression(InferenceBackend([a, a])(x), 0.02, 0.999, max_det=10000)
    assert [len(d) for d in single] == [len(d) for d in double] and sum(len(d) for d in single) > 0
    for s, d in zip(single, double):  # as sets: equal scores may come out in another order
        assert torch.equal(_sorted_rows(s), _sorted_rows(d))


def test_ensemble_validates_to_the_checkpoints_map(checkpoints, tiny_data, tmp_path):
    a = checkpoints[0]
    common = dict(data=str(tiny_data), imgsz=128, batch_size=4, workers=0, device="cpu", project=str(tmp_path),
                  plots=False)
    single, _ = evaluate(EvalOptions(weights=a, name="single", **common))
    double, _ = evaluate(EvalOptions(weights=[a, a], name="double", **common))
    # an untrained model ties many scores, and NMS may keep another of two equal-score boxes: near, not exact
    assert single.map50 == pytest.approx(double.map50, rel=1e-3) and single.map == pytest.approx(double.map, rel=1e-3)
    assert single.map50 > 0


def test_ensembles_take_checkpoints_of_the_same_classes_only(checkpoints, tmp_path):
    a, _, other = checkpoints
    with pytest.raises(ValueError, match="same classes"):
        InferenceBackend([a, other])
    onnx = tmp_path / "a.onnx"
    onnx.write_bytes(b"not used")
    with pytest.raises(ValueError, match=r"takes \.pt checkpoints only"):
        InferenceBackend([a, onnx])


def test_ensemble_test_time_augmentation_runs_each_model(checkpoints):
    a, b, _ = checkpoints
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    both = InferenceBackend([a, b])(x, augment=True)
    assert both.shape[1] == InferenceBackend(a)(x, augment=True).shape[1] * 2


def test_detect_cli_with_two_weights_runs_the_ensemble(checkpoints, tmp_path):
    import cv2
    import numpy as np

    import detect

    a, b, _ = checkpoints
    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (128, 160, 3), dtype=np.uint8))
    args = ["--source", str(image), "--imgsz", "128", "--device", "cpu", "--save-txt", "--save-conf",
            "--conf-thres", "0.01", "--iou-thres", "0.999", "--nosave", "--project", str(tmp_path)]  # see above
    assert detect.main(["--weights", str(a), *args, "--name", "single"]) == 0
    assert detect.main(["--weights", str(a), str(a), *args, "--name", "double"]) == 0
    single = (tmp_path / "single" / "labels" / "im.txt").read_text().splitlines()
    double = (tmp_path / "double" / "labels" / "im.txt").read_text().splitlines()
    assert len(single) > 0 and sorted(single) == sorted(double)
    assert detect.main(["--weights", str(a), str(checkpoints[2]), *args, "--name", "bad"]) == 1  # other classes
