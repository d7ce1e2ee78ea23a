"""train.py --image-weights and --quad as YOLOv5 defines them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data.dataset import LoadImagesAndLabels
from engine.callbacks import Callback
from engine.trainer import Trainer
from tests.test_trainer import StopAfterFirstEpoch, _options
from utils.metrics import labels_to_class_weights, labels_to_image_weights


def _labels(*classes):
    return np.array([[c, 0.5, 0.5, 0.1, 0.1] for c in classes], dtype=np.float32).reshape(-1, 5)


def test_class_and_image_weights_follow_yolov5s_rule():
    labels = [_labels(0, 0), _labels(1), _labels()]  # class 0: 2 boxes, class 1: 1 box, class 2: none
    cw = labels_to_class_weights(labels, 3)
    np.testing.assert_allclose(cw, [0.2, 0.4, 0.4])  # 1/2, 1/1, 1/1 (no box counts as 1), normalised
    np.testing.assert_allclose(labels_to_image_weights(labels, 3, cw), [0.4, 0.4, 0.0])


def _item(value: int, classes_xy):
    image = torch.full((3, 64, 64), value, dtype=torch.uint8)
    labels = torch.tensor([[0, c, x, y, 0.2, 0.2] for c, x, y in classes_xy], dtype=torch.float32).view(-1, 6)
    return image, labels, f"im{value}.jpg", None


def test_quad_collate_tiles_four_images_and_moves_their_labels():
    # an even pixel sum picks the 2x2 tiling: values 2, 4, 6, 8 keep every sum even
    batch = [_item(2, [(0, 0.5, 0.5)]), _item(4, [(1, 0.25, 0.5)]), _item(6, []), _item(8, [(2, 0.5, 0.5)])]
    images, targets, paths, _ = LoadImagesAndLabels.collate_fn4(batch)
    assert images.shape == (1, 3, 128, 128) and paths == ("im2.jpg",)
    assert images[0, 0, 10, 10] == 2 and images[0, 0, 100, 10] == 4  # below the first: the second
    assert images[0, 0, 10, 100] == 6 and images[0, 0, 100, 100] == 8  # right: the third and fourth
    expected = torch.tensor([[0, 0, 0.25, 0.25, 0.1, 0.1], [0, 1, 0.125, 0.75, 0.1, 0.1],
                             [0, 2, 0.75, 0.75, 0.1, 0.1]])
    assert torch.allclose(targets, expected)


def test_quad_collate_may_upsample_the_first_image_instead():
    first = _item(1, [(3, 0.3, 0.6)])
    first[0][0, 0, 0] = 2  # an odd sum of the sampled pixels picks the upsampling
    batch = [first, _item(2, []), _item(3, []), _item(4, []), _item(2, []), _item(4, []), _item(6, []),
             _item(8, [])]
    images, targets, paths, _ = LoadImagesAndLabels.collate_fn4(batch)
    assert images.shape == (2, 3, 128, 128) and len(paths) == 2
    assert (images[0, :, 8:, 8:] == 1).all() and (images[0, 1:] == 1).all()  # the first image, twice the size
    assert torch.allclose(targets, torch.tensor([[0, 3, 0.3, 0.6, 0.2, 0.2]]))
    with pytest.raises(ValueError, match="at least 4 images"):
        LoadImagesAndLabels.collate_fn4(batch[:3])


class RecordBatches(Callback):
    def __init__(self):
        self.shapes, self.indices = [], {}

    def before_epoch(self, trainer):
        self.indices[trainer.epoch] = None

    def before_step(self, trainer):
        self.shapes.append(tuple(trainer.batch[0].shape))
        self.indices[trainer.epoch] = np.array(trainer.train_set.indices)


def test_quad_training_runs_quarter_batches_at_twice_the_size(tmp_path, tiny_data):
    recorder = RecordBatches()
    trainer = Trainer(_options(tmp_path, tiny_data, "quad", epochs=1, quad=True, noval=True),
                      torch.device("cpu"), callbacks=[recorder])
    trainer.run()
    assert recorder.shapes and set(recorder.shapes) == {(2, 3, 192, 192)}  # batch 8 at 96 px -> 2 at 192
    with pytest.raises(ValueError, match="--batch-size 6 gives 6 per process, not a multiple of 4"):
        options = dataclasses.replace(_options(tmp_path, tiny_data, "bad", quad=True), batch_size=6)
        Trainer(options, torch.device("cpu")).setup()


def test_image_weights_refuse_rect(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="--image-weights .* cannot be combined with --rect"):
        options = _options(tmp_path, tiny_data, "rect", image_weights=True, rect=True)
        Trainer(options, torch.device("cpu")).setup()


@pytest.mark.slow
def test_image_weights_favour_weak_classes_and_survive_resume(tmp_path, tiny_data):
    device = torch.device("cpu")
    full_record = RecordBatches()
    full = Trainer(_options(tmp_path, tiny_data, "full", image_weights=True), device, callbacks=[full_record])
    full.run()
    labels, nc = full.train_set.labels, full.nc
    drawn = full_record.indices[0]
    assert len(drawn) == len(labels) and len(set(drawn.tolist())) < len(labels)  # drawn with replacement
    weights = labels_to_image_weights(labels, nc, labels_to_class_weights(labels, nc))
    assert weights[drawn].mean() > weights.mean()  # heavier images (rarer classes) come more often
    assert not np.array_equal(full_record.indices[0], full_record.indices[1])  # a new draw each epoch

    killed = Trainer(_options(tmp_path, tiny_data, "killed", image_weights=True), device,
                     callbacks=[StopAfterFirstEpoch()])
    killed.run()
    last = tmp_path / "killed" / "weights" / "last.pt"
    resumed_record = RecordBatches()
    resumed = Trainer(_options(tmp_path, tiny_data, "killed", image_weights=True, resume=True,
                               resume_path=str(last)), device, callbacks=[resumed_record])
    resumed.run()
    assert len(resumed.maps) == nc
    np.testing.assert_array_equal(resumed_record.indices[1], full_record.indices[1])  # maps came back too
