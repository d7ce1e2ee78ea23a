"""Shared fixtures: small generated datasets and checkpoints (CPU, offline)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_dataset_cache(tmp_path_factory):
    """Generated datasets go to a per-session temp folder unless the caller chose one."""
    if not os.environ.get("VITDET_DATASETS"):
        os.environ["VITDET_DATASETS"] = str(tmp_path_factory.mktemp("datasets"))
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small built-in-style dataset (32 train, 12 val images, 6 classes); returns its YAML path."""
    from data.builtin import generate_builtin

    root = generate_builtin(tmp_path_factory.mktemp("tiny") / "shapes", splits={"train": 32, "val": 12})
    return root / "builtin.yaml"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained yolov5n checkpoint for the built-in classes whose head is biased to fire everywhere
    (objectness ~0.95, classes ~0.5), so inference paths have boxes to handle."""
    from data.builtin import CLASS_NAMES
    from models.yolo import DetectionModel
    from engine.checkpoint import checkpoint_dict, save_checkpoint

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=len(CLASS_NAMES))
    model.names = list(CLASS_NAMES)
    with torch.no_grad():
        for conv in model.model[-1].m:
            bias = conv.bias.view(model.model[-1].na, -1)
            bias[:, 4] = 3.0
            bias[:, 5:] = 0.0
    path = tmp_path_factory.mktemp("weights") / "yolov5n-shapes.pt"
    return save_checkpoint(checkpoint_dict(model), path)


def pytest_collection_modifyitems(config, items):
    """Tests that start OpenVINO run last. Once OpenVINO's runtime (its TBB thread pool) is up in a
    process, a later fork() in that process (multiprocessing pools, subprocess) crashed the whole pytest
    run with a segmentation fault twice in CI, at two different forking tests; OpenVINO does not
    support fork after it is initialised. Running them last keeps every fork before it."""
    items.sort(key=lambda item: "openvino" in item.nodeid.lower())
