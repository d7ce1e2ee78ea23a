"""Issue 15, item 7: a hyperparameter file is checked as a whole before anything starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from data.dataset import LoadImagesAndLabels
from tests.data_fixtures import no_augment_hyp, write_sample
from utils.hyp import HYP_RULES, check_hyp

HYP_DIR = Path(__file__).resolve().parents[1] / "configs" / "hyps"
HYPS = sorted(HYP_DIR.glob("*.yaml"))
SOURCE = "configs/hyps/mine.yaml"


def scratch_low(**changes) -> dict:
    hyp = yaml.safe_load((HYP_DIR / "hyp.scratch-low.yaml").read_text())
    hyp.update(changes)
    return hyp


def problems(hyp: dict) -> str:
    with pytest.raises(ValueError) as err:
        check_hyp(hyp, SOURCE)
    return str(err.value)


@pytest.mark.parametrize("path", HYPS, ids=[p.name for p in HYPS])
def test_shipped_files_pass_unchanged(path):
    hyp = yaml.safe_load(path.read_text())
    assert check_hyp(hyp, str(path)) == hyp
    assert set(hyp) <= set(HYP_RULES)


def test_missing_key_is_named_with_the_file():
    hyp = scratch_low()
    del hyp["lr0"]
    message = problems(hyp)
    assert SOURCE in message and "lr0" in message and "missing" in message


@pytest.mark.parametrize("key, value, words", [
    ("mosaic", "yes", "not a number"),
    ("mosaic", True, "not a number"),  # YAML 1.1 reads an unquoted yes as true
    ("lr0", None, "no value"),
    ("hsv_h", [0.1], "not a number"),
    ("lr0", float("nan"), "finite"),
    ("lr0", "inf", "finite"),
    ("fliplr", 7, "[0, 1]"),
    ("lr0", 0, "> 0"),
    ("lrf", 0.0, "(0, 1]"),
    ("momentum", 1.0, "[0, 1)"),
    ("warmup_epochs", -1, ">= 0"),
    ("anchor_t", 1.0, "> 1"),
    ("box", -0.05, ">= 0"),
    ("scale", 1.2, "[0, 1)"),
    ("anchors", -1, ">= 0"),
    ("backbone_lr_mult", 0, "> 0"),
    ("layer_decay", 1.5, "(0, 1]"),
    ("drop_path", 1.0, "[0, 1)"),
])  # fmt: skip
def test_wrong_types_and_impossible_values_are_named(key, value, words):
    message = problems(scratch_low(**{key: value}))
    assert f"{SOURCE}: {key}: " in message and words in message


def test_misspelt_key_gets_the_closest_match():
    message = problems(scratch_low(flipLR=0.5, mixupp=0.1))
    assert "flipLR: unknown key (did you mean 'fliplr'?)" in message
    assert "mixupp: unknown key (did you mean 'mixup'?)" in message


def test_every_problem_in_one_message():
    hyp = scratch_low(mosaic="yes", fliplr=7, flipLR=0.5)
    del hyp["lr0"]
    message = problems(hyp)
    assert "4 problems" in message
    for key in ("lr0", "mosaic", "fliplr", "flipLR"):
        assert f"{SOURCE}: {key}: " in message


def test_yaml_1_1_exponent_strings_are_converted():
    text = (HYP_DIR / "hyp.scratch-low.yaml").read_text()
    hyp = yaml.safe_load(text.replace("0.0005", "5e-4").replace("lr0: 0.01", "lr0: 1e-2"))
    assert hyp["weight_decay"] == "5e-4"  # PyYAML: a float needs a dot in YAML 1.1
    clean = check_hyp(hyp, SOURCE)
    assert clean["weight_decay"] == 5e-4 and clean["lr0"] == 0.01
    assert hyp["weight_decay"] == "5e-4"  # the input is not modified


def test_optional_keys_and_defaults():
    hyp = scratch_low(anchors=3.2, backbone_lr_mult=0.1, layer_decay=0.75, drop_path=0.1)  # evolve: floats
    del hyp["fl_gamma"], hyp["iou_t"]
    clean = check_hyp(hyp, SOURCE)
    assert clean["fl_gamma"] == 0.0  # the loss needs it; YOLOv5's default
    assert clean["anchors"] == 3 and isinstance(clean["anchors"], int)
    assert "iou_t" not in clean
    assert isinstance(check_hyp(scratch_low(lr0=np.float32(0.01)), SOURCE)["lr0"], float)


def test_narrower_required_set_for_the_dataset():
    assert check_hyp(no_augment_hyp(), SOURCE, required=("mosaic",))["mosaic"] == 0.0
    with pytest.raises(ValueError, match="copy_paste: missing"):
        check_hyp({"mosaic": 1.0}, SOURCE, required=("mosaic", "copy_paste"))


def test_dataset_rejects_a_bad_hyp_when_built_not_in_the_first_batch(tmp_path):
    write_sample(tmp_path, "train", "a.png", np.zeros((32, 32, 3), np.uint8), "0 0.5 0.5 0.2 0.2\n")
    images = tmp_path / "images" / "train"
    with pytest.raises(ValueError, match="mosaic: 'yes' is not a number"):
        LoadImagesAndLabels(images, 32, augment=True, hyp=no_augment_hyp(mosaic="yes"))
    with pytest.raises(ValueError, match=r"fliplr: 7 is not in \[0, 1\]"):
        LoadImagesAndLabels(images, 32, augment=True, hyp=no_augment_hyp(fliplr=7))
