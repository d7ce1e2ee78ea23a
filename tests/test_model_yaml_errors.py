"""A model YAML that cannot be built is refused with the file, the row or key, and what was expected."""

from __future__ import annotations

import copy

import pytest
import yaml

from models.yolo import DetectionModel, ModelConfigError
from utils.general import resolve_config

BASE = yaml.safe_load(resolve_config("yolov5n.yaml", "models").read_text())


def _write(tmp_path, change) -> str:
    d = copy.deepcopy(BASE)
    change(d)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("nc"), r"missing the key 'nc'"),
    (lambda d: d.update(nc="three"), r"'nc' \(number of classes\) must be a positive integer, got 'three'"),
    (lambda d: d.update(depth_multiple="x"), r"'depth_multiple' must be a positive number .* got 'x'"),
    (lambda d: d.update(width_multiple=-1), r"'width_multiple' must be a positive number"),
    (lambda d: d.update(anchors=[[10, 13, 16]]), r"'anchors' must be a list of levels"),
    (lambda d: d.update(head="none"), r"'head' must be a non-empty list"),
])
def test_top_level_keys_are_checked_naming_the_file(tmp_path, change, expected):
    path = _write(tmp_path, change)
    with pytest.raises(ModelConfigError, match=expected) as info:
        DetectionModel(path)
    assert str(info.value).startswith(path)


def test_all_top_level_problems_come_in_one_message(tmp_path):
    path = _write(tmp_path, lambda d: (d.pop("nc"), d.update(depth_multiple="x")))
    with pytest.raises(ModelConfigError, match=r"missing the key 'nc'.*'depth_multiple'"):
        DetectionModel(path)


@pytest.mark.parametrize("channels, shown", [([64, 32], r"\[64, 32\]"), (-16, "-16"), ("wide", "'wide'")])
def test_bad_channel_arguments_name_the_row(tmp_path, channels, shown):
    path = _write(tmp_path, lambda d: d["backbone"][1][3].__setitem__(0, channels))
    with pytest.raises(ModelConfigError, match=r"row 1 .*Conv's first argument is its output channels, a "
                                               r"positive integer; got " + shown):
        DetectionModel(path)


def test_arguments_of_the_wrong_shape_name_the_row(tmp_path):
    path = _write(tmp_path, lambda d: d["head"][1].__setitem__(3, ["None", "two", "nearest"]))
    with pytest.raises(ModelConfigError, match=r"row 11 "):
        DetectionModel(path)


def test_nc_override_still_works_without_reading_a_missing_key(tmp_path):
    path = _write(tmp_path, lambda d: d.pop("nc"))
    with pytest.raises(ModelConfigError, match="missing the key 'nc'"):  # not KeyError: 'nc'
        DetectionModel(path, nc=3)
