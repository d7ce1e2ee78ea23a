"""val.py: the validation loop against pycocotools, rectangular batches, flags and outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import val
from engine.evaluation import coco_id_function, evaluate_with_pycocotools
from engine.validator import ValOptions, Validator


class NoisyOracle:
    """Stands in for a detector: returns the batch's own labels, jittered, plus false positives."""

    device = torch.device("cpu")

    def __init__(self, nc: int, seed: int = 0):
        self.nc, self.targets = nc, None
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, im: torch.Tensor):
        b, _, h, w = im.shape
        rows = [torch.zeros(0, 5 + self.nc)] * b
        for i in range(b):
            t = self.targets[self.targets[:, 0] == i]
            n = len(t)
            xywh = t[:, 2:6] * torch.tensor([w, h, w, h])
            keep = torch.rand(n, generator=self.g) > 0.15  # some boxes missed
            xywh = xywh[keep]
            noise = 0.08 * torch.randn(len(xywh), 4, generator=self.g)  # relative to the box size
            xywh = torch.cat((xywh[:, :2] + noise[:, :2] * xywh[:, 2:], xywh[:, 2:] * (1 + noise[:, 2:])), 1)
            cls = t[keep, 1].long()
            fp = torch.rand(3, 4, generator=self.g) * torch.tensor([w, h, w / 4, h / 4])  # false positives
            boxes = torch.cat((xywh, fp))
            scores = torch.zeros(len(boxes), self.nc)
            scores[torch.arange(len(cls)), cls] = 0.5 + 0.5 * torch.rand(len(cls), generator=self.g)
            scores[len(cls):, 0] = 0.3 * torch.rand(3, generator=self.g)
            rows[i] = torch.cat((boxes, torch.ones(len(boxes), 1), scores), 1)
        width = max(len(r) for r in rows)
        out = torch.zeros(b, width, 5 + self.nc)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out


class FeedTargets:
    """A loader wrapper that shows each batch's targets to the oracle before the loop uses them."""

    def __init__(self, loader, oracle):
        self.loader, self.oracle = loader, oracle
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.oracle.targets = batch[1].clone()
            yield batch


def test_map_agrees_with_pycocotools_through_the_val_path(tmp_path, tiny_data):
    from data.config import check_dataset
    from data.loaders import create_dataloader

    cfg = check_dataset(str(tiny_data))
    loader, _ = create_dataloader(cfg["val"], 160, 4, 32, rect=True, pad=0.5, workers=0, names=cfg["names"])
    oracle = NoisyOracle(cfg["nc"])
    options = ValOptions(save_dir=tmp_path, plots=True, save_json=True)
    results = Validator(FeedTargets(loader, oracle), cfg["names"], options, coco_ids=coco_id_function(cfg))(oracle)
    coco = evaluate_with_pycocotools(cfg, "val", results, tmp_path)
    assert 0.3 < results.map < 0.95  # a real, imperfect score
    assert abs(results.map - coco["map50_95"]) <= 0.01
    assert abs(results.map50 - coco["map50"]) <= 0.01
    for name in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png",
                 "val_batch0_labels.jpg", "val_batch0_pred.jpg", "predictions.json"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_perfect_predictions_score_one(tmp_path, tiny_data):
    from data.config import check_dataset
    from data.loaders import create_dataloader

    cfg = check_dataset(str(tiny_data))
    loader, _ = create_dataloader(cfg["val"], 160, 4, 32, rect=True, pad=0.5, workers=0, names=cfg["names"])

    class Perfect(NoisyOracle):
        def __call__(self, im):
            b, _, h, w = im.shape
            t = self.targets
            out = torch.zeros(b, max(1, int(torch.bincount(t[:, 0].long(), minlength=b).max())), 5 + self.nc)
            for i in range(b):
                ti = t[t[:, 0] == i]
                out[i, : len(ti), :4] = ti[:, 2:6] * torch.tensor([w, h, w, h])
                out[i, : len(ti), 4] = 1
                out[i, torch.arange(len(ti)), 5 + ti[:, 1].long()] = 1
            return out

    oracle = Perfect(cfg["nc"])
    results = Validator(FeedTargets(loader, oracle), cfg["names"], ValOptions(plots=False))(oracle)
    assert results.map50 == pytest.approx(1.0, abs=1e-6) and results.map == pytest.approx(1.0, abs=0.02)


def test_val_cli_on_checkpoint_writes_outputs_and_speed(tmp_path, tiny_data, tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="vitdet")
    assert val.main(["--weights", str(tiny_checkpoint), "--data", str(tiny_data), "--imgsz", "160",
                     "--batch-size", "4", "--workers", "0", "--project", str(tmp_path), "--save-txt",
                     "--save-conf", "--conf-thres", "0.01"]) == 0
    run = tmp_path / "exp"
    assert (run / "confusion_matrix.png").exists() and (run / "metrics.yaml").exists()
    label_files = list((run / "labels").glob("*.txt"))
    assert label_files
    first = label_files[0].read_text().split("\n")[0].split()
    assert len(first) == 6 and all(0 <= float(v) <= 1 for v in first[1:5])
    assert any("Speed:" in r.message and "per image at shape" in r.message for r in caplog.records)
    assert any(r.message.strip().startswith("all") for r in caplog.records)


def test_task_speed_prints_speed_line(tmp_path, tiny_data, tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="vitdet")
    val.main(["--weights", str(tiny_checkpoint), "--data", str(tiny_data), "--imgsz", "128", "--task", "speed",
              "--batch-size", "4", "--workers", "0", "--project", str(tmp_path)])
    line = next(r.message for r in caplog.records if r.message.startswith("Speed:"))
    assert "pre-process" in line and "inference" in line and "NMS" in line


def test_half_refused_on_cpu(tiny_data, tiny_checkpoint):
    with pytest.raises(ValueError, match="--half needs a CUDA device"):
        val.run(data=str(tiny_data), weights=str(tiny_checkpoint), device="cpu", half=True)


def test_wrong_class_count_is_refused(tmp_path, tiny_data):
    from models.yolo import DetectionModel
    from engine.checkpoint import checkpoint_dict, save_checkpoint

    path = save_checkpoint(checkpoint_dict(DetectionModel("yolov5n.yaml", nc=3)), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="predicts 3 classes but dataset"):
        val.run(data=str(tiny_data), weights=str(path), device="cpu")


MODEL_YAMLS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", MODEL_YAMLS)
def test_every_model_validates_on_rectangular_batches(cfg, tmp_path, tiny_data):
    from data.config import check_dataset
    from data.loaders import create_dataloader
    from models.yolo import DetectionModel

    model = DetectionModel(cfg, nc=6).eval()
    data = check_dataset(str(tiny_data))
    loader, dataset = create_dataloader(data["val"], 256, 4, int(model.stride.max()), rect=True, pad=0.5,
                                        workers=0, names=data["names"])
    assert any(h != w for h, w in dataset.batch_shapes)  # the batches really are rectangular
    results = Validator(loader, data["names"], ValOptions(plots=False, conf_thres=0.01))(model)
    assert results.speed[1] > 0 and len(results.maps) == 6


@pytest.mark.slow
def test_onnx_export_validates_to_the_same_map_as_the_checkpoint(tmp_path, tiny_data, tiny_checkpoint):
    import shutil

    from engine.exporter import export_model

    weights = shutil.copy(tiny_checkpoint, tmp_path / "w.pt")
    onnx_file = export_model(weights, include=("onnx",), imgsz=(160, 160), dynamic=True)["onnx"]
    common = dict(data=str(tiny_data), imgsz=160, batch_size=4, workers=0, project=str(tmp_path), plots=False,
                  conf_thres=0.01)
    pt_results, _ = val.run(weights=weights, name="pt", **common)
    onnx_results, _ = val.run(weights=str(onnx_file), name="onnx", **common)
    assert pt_results.map50 > 0  # something was matched, so the comparison means something
    assert abs(pt_results.map - onnx_results.map) <= 0.001
    assert abs(pt_results.map50 - onnx_results.map50) <= 0.001
