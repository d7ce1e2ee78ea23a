"""check_dataset: YAML resolution, names, paths, errors; the shipped dataset YAMLs; convert on first use."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import yaml

import data.builtin as builtin
from data.config import DATA_CONFIGS, REPO_ROOT, check_dataset, datasets_dir, names_list, resolve_data_yaml
from tests.data_fixtures import draw_boxes, write_sample


def _yaml(yaml_file, **content):
    yaml_file.write_text(yaml.safe_dump(content))
    return yaml_file


@pytest.fixture()
def folders(tmp_path):
    for split in ("train", "val"):
        img = draw_boxes(32, 32, [(2, 2, 20, 20)], [0])
        write_sample(tmp_path, split, "a.png", img, "0 0.5 0.5 0.5 0.5\n")
    return tmp_path


def test_paths_are_resolved_like_yolov5(folders):
    splits = {"train": "images/train", "val": "images/val"}
    names = {0: "cat", 1: "dog"}
    absolute = check_dataset(_yaml(folders / "abs.yaml", path=str(folders), names=names, **splits))
    assert absolute["train"] == str(folders / "images" / "train") and absolute["names"] == ["cat", "dog"]
    assert absolute["nc"] == 2 and absolute["test"] is None
    assert absolute["yaml_file"] == str(folders / "abs.yaml")
    # no `path`: the YAML's folder; a list of sources stays a list
    here = check_dataset(_yaml(folders / "here.yaml", train=["images/train", "images/val"], val="images/val",
                               names=["cat"]))  # fmt: skip
    assert here["path"] == str(folders)
    assert here["train"] == [str(folders / "images" / s) for s in ("train", "val")]
    # relative `path`: relative to the repository root
    relative = os.path.relpath(folders, REPO_ROOT)
    rel = check_dataset({"path": relative, "train": "images/train", "val": "images/val", "names": ["cat"]})
    assert rel["path"] == str(folders) and rel["yaml_file"] is None


def test_names_forms_and_errors():
    assert names_list(["a", "b"], None, "x") == ["a", "b"]
    assert names_list({1: "b", 0: "a"}, 2, "x") == ["a", "b"]
    assert names_list(None, 3, "x") == ["class0", "class1", "class2"]
    with pytest.raises(ValueError, match="nc=3 but 'names' has 2"):
        names_list(["a", "b"], 3, "x.yaml")
    with pytest.raises(ValueError, match=r"ids must be 0..1 without gaps, got \[0, 2\]"):
        names_list({0: "a", 2: "c"}, None, "x.yaml")
    with pytest.raises(KeyError, match="no 'names'"):
        names_list(None, None, "x.yaml")


def test_missing_paths_and_keys_are_clear_errors(folders, caplog):
    with pytest.raises(FileNotFoundError, match=r"'val' path .*images/nope does not exist\. get it from"):
        check_dataset(_yaml(folders / "d.yaml", train="images/train", val="images/nope", names=["a"],
                            download="get it from the web"))  # fmt: skip
    with pytest.raises(KeyError, match="missing 'val' key"):
        check_dataset(_yaml(folders / "e.yaml", train="images/train", names=["a"]))
    with_test = _yaml(folders / "f.yaml", train="images/train", val="images/val", test="gone", names=["a"])
    cfg = check_dataset(with_test)
    assert cfg["test"] is None and "test path" in caplog.text
    with pytest.raises(FileNotFoundError, match="dataset YAML 'no_such_data' not found"):
        check_dataset("no_such_data")


def test_bare_names_resolve_in_configs_data():
    assert resolve_data_yaml("coco") == DATA_CONFIGS / "coco.yaml"
    assert resolve_data_yaml("voc.yaml") == DATA_CONFIGS / "voc.yaml"
    with pytest.raises(FileNotFoundError, match="coco.yaml"):  # the message lists what exists
        resolve_data_yaml("cocoa")


def test_absent_public_datasets_say_how_to_get_them(tmp_path, monkeypatch):
    cfg = yaml.safe_load((DATA_CONFIGS / "coco.yaml").read_text())
    if os.path.exists((REPO_ROOT / cfg["path"]).resolve()):
        pytest.skip(f"{cfg['path']} exists on this machine")
    with pytest.raises(FileNotFoundError, match="not downloaded by this project"):
        check_dataset("coco.yaml")
    assert len(cfg["names"]) == 80  # voc.yaml downloads its data: tests/test_download.py


def test_builtin_yaml_matches_the_generator_and_is_generated_on_first_use(tmp_path, monkeypatch):
    cfg = yaml.safe_load((DATA_CONFIGS / "builtin.yaml").read_text())
    assert [cfg["names"][i] for i in range(len(cfg["names"]))] == list(builtin.CLASS_NAMES)
    monkeypatch.setenv("VITDET_DATASETS", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "SPLITS", {"train": 3, "val": 2})
    resolved = check_dataset("builtin")
    assert datasets_dir() == tmp_path / "cache"
    assert resolved["path"] == str(tmp_path / "cache" / f"builtin-v{builtin.VERSION}")
    assert len(os.listdir(resolved["train"])) == 3 and len(os.listdir(resolved["val"])) == 2
    assert resolved["names"] == list(builtin.CLASS_NAMES) and resolved["nc"] == 6


def test_voc_source_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    src = tmp_path / "voc"
    (src / "Annotations").mkdir(parents=True)
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "JPEGImages").mkdir()
    for k, split in enumerate(["train", "val"]):
        cv2.imwrite(str(src / "JPEGImages" / f"{k}.jpg"), np.zeros((40, 40, 3), np.uint8))
        (src / "Annotations" / f"{k}.xml").write_text(
            f"<annotation><filename>{k}.jpg</filename><object><name>cell</name><difficult>0</difficult>"
            "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>30</ymax></bndbox>"
            "</object></annotation>"
        )
        (src / "ImageSets" / "Main" / f"{split}.txt").write_text(f"{k}\n")
    monkeypatch.setenv("VITDET_DATASETS", str(tmp_path / "cache"))
    data_yaml = _yaml(tmp_path / "cells.yaml", convert={"format": "voc", "source": str(src)},
                      train="images/train", val="images/val", names=["cell"])  # fmt: skip
    first = check_dataset(data_yaml)
    assert first["path"].startswith(str(tmp_path / "cache" / "cells-"))
    assert os.listdir(first["train"]) == ["0.jpg"] and os.listdir(first["val"]) == ["1.jpg"]
    label = os.path.join(first["path"], "labels", "train", "0.txt")
    stamp = os.stat(label).st_mtime_ns
    assert check_dataset(data_yaml)["path"] == first["path"] and os.stat(label).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="'convert' must be a mapping"):
        check_dataset(_yaml(tmp_path / "bad.yaml", convert={"format": "kitti", "source": "x"},
                            train="a", val="b", names=["c"]))  # fmt: skip


def test_bccd_yaml_downloads_the_voc_folder_or_uses_the_local_copy():
    cfg = yaml.safe_load((DATA_CONFIGS / "bccd.yaml").read_text())
    assert cfg["convert"]["format"] == "voc" and cfg["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}
    assert cfg["download"][0]["url"].startswith("https://github.com/Shenggan/BCCD_Dataset/archive/")
    assert cfg["convert"]["source"].endswith("/BCCD")  # inside the archive
    assert (REPO_ROOT / cfg["convert"]["local"]).resolve().name == "bccd"  # the copy measurements use
