"""The Python API: Detector on every input kind agrees with detect.py; Results methods; torch.hub offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from engine import Detector, Results
from engine.checkpoint import checkpoint_dict, save_checkpoint
from models.yolo import DetectionModel
from tests.test_reliability_detect import QuietHandler, http_folder  # noqa: F401 -- the fixture

REPO = Path(__file__).resolve().parents[1]
NAMES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
CONF, IMGSZ = 0.4, 256


def _checkpoint(path: Path, names=NAMES, seed: int = 0) -> Path:
    """A yolov5n whose random norms make scores differ box to box (an untrained model ties them)."""
    torch.manual_seed(seed)
    model = DetectionModel("yolov5n.yaml", nc=len(names))
    model.names = list(names)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1, 0.5)
                module.bias.normal_(0, 0.5)
        for conv in model.model[-1].m:  # wide scores: 100-200 boxes above CONF on the test images
            conv.weight.normal_(0, 0.3)
            conv.bias.zero_()
    return save_checkpoint(checkpoint_dict(model), path)


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = np.full((*size, 3), 114, np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, size[1] - 30)), int(rng.integers(0, size[0] - 30))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(im, (x, y), (x + int(rng.integers(10, 60)), y + int(rng.integers(10, 60))), colour, -1)
    return im


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, image folder, {file name: image}, {stem: detect.py's label rows})."""
    root = tmp_path_factory.mktemp("api")
    weights = _checkpoint(root / "w.pt")
    folder = root / "images"
    folder.mkdir()
    images = {"wide.jpg": _image(0, (240, 320)), "tall.png": _image(1, (300, 200))}
    for name, im in images.items():
        cv2.imwrite(str(folder / name), im)
    images = {name: cv2.imread(str(folder / name)) for name in images}  # as decoded (JPEG is lossy)
    assert detect.main(["--weights", str(weights), "--source", str(folder), "--imgsz", str(IMGSZ),
                        "--conf-thres", str(CONF), "--save-txt", "--save-conf", "--nosave",
                        "--project", str(root / "runs"), "--name", "detect"]) == 0
    labels = {}
    for name in images:
        file = root / "runs" / "detect" / "labels" / f"{Path(name).stem}.txt"
        labels[name] = np.loadtxt(file, ndmin=2)  # class x y w h conf (normalised)
    return weights, folder, images, labels


def _sorted(rows: np.ndarray) -> np.ndarray:
    """Rows in a fixed order whatever order NMS gave equal scores (keys rounded: labels have 6 digits)."""
    return rows[np.lexsort(np.round(rows, 3).T[::-1])]


def _assert_same_as_detect(results: Results, expected: list[np.ndarray]) -> None:
    assert len(results) == len(expected)
    for xywhn, rows in zip(results.xywhn, expected):
        ours = xywhn.numpy()[:, [5, 0, 1, 2, 3, 4]]  # to detect.py's column order: class x y w h conf
        assert len(rows) > 3 and ours.shape == rows.shape
        np.testing.assert_allclose(_sorted(ours), _sorted(rows), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def detector(setup):
    return Detector(setup[0], conf=CONF, imgsz=IMGSZ)


def _inputs(kind: str, folder: Path, images: dict, base_url: str | None = None):
    names = list(images)
    if kind == "str":
        return [str(folder / n) for n in names]
    if kind == "Path":
        return [folder / n for n in names]
    if kind == "numpy":
        return [images[n] for n in names]
    if kind == "PIL":
        from PIL import Image

        return [Image.fromarray(images[n][..., ::-1].copy()) for n in names]
    if kind == "float tensor":
        return [torch.from_numpy(images[n][..., ::-1].copy()).permute(2, 0, 1).float() / 255 for n in names]
    if kind == "uint8 tensor":
        return [torch.from_numpy(images[n][..., ::-1].copy()).permute(2, 0, 1) for n in names]
    if kind == "URL":
        return [f"{base_url}/{n}" for n in names]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["str", "Path", "numpy", "PIL", "float tensor", "uint8 tensor"])
def test_detector_on_each_input_kind_equals_detect_py(setup, detector, kind):
    _, folder, images, labels = setup
    results = detector(_inputs(kind, folder, images))
    _assert_same_as_detect(results, [labels[n] for n in images])


def test_detector_on_one_input_and_on_a_mix(setup, detector, http_folder):  # noqa: F811
    _, folder, images, labels = setup
    served, base = http_folder
    for name in images:
        (served / name).write_bytes((folder / name).read_bytes())
    wide, tall = list(images)
    _assert_same_as_detect(detector(str(folder / wide)), [labels[wide]])
    _assert_same_as_detect(detector(f"{base}/{tall}"), [labels[tall]])
    pil = _inputs("PIL", folder, images)[0]
    mix = [f"{base}/{wide}", images[tall], pil, _inputs("float tensor", folder, images)[1], folder / wide]
    results = detector(mix)
    _assert_same_as_detect(results, [labels[wide], labels[tall], labels[wide], labels[tall], labels[wide]])
    assert results.files == [wide, "image1.jpg", "image2.jpg", "image3.jpg", wide]


def test_a_batched_tensor_gives_one_result_per_image(setup, detector):
    _, folder, images, labels = setup
    wide = list(images)[0]
    one = _inputs("float tensor", folder, images)[0]
    _assert_same_as_detect(detector(torch.stack([one, one])), [labels[wide], labels[wide]])


def test_batch_size_runs_same_shaped_images_together(setup):
    weights, folder, images, labels = setup
    wide = folder / list(images)[0]
    detector = Detector(weights, conf=CONF, imgsz=IMGSZ, batch_size=3)
    outputs, forward = [], detector.forward
    detector.forward = lambda x: outputs.append(forward(x)) or outputs[-1]
    batched = detector([wide, wide, folder / "tall.png", wide])
    assert sorted(len(o) for o in outputs) == [1, 3] and len(batched) == 4 and batched.files[2] == "tall.png"
    single = Detector(weights, conf=CONF, imgsz=IMGSZ)
    alone = single.forward(torch.from_numpy(single.letterbox(cv2.imread(str(wide))))[None].float() / 255)
    together = next(o for o in outputs if len(o) == 3)
    # compare the raw rows, not box counts: this random model has many scores on the threshold, and a
    # batch's different float summation order moves some of them across it
    for row in together:
        assert torch.allclose(row, alone[0], rtol=1e-3, atol=1e-3 * float(alone[0].abs().max()))
    assert len(batched.xyxy[0]) == len(batched.xyxy[1]) == len(batched.xyxy[3])
    with pytest.raises(ValueError, match="batch_size 0"):
        Detector(weights, batch_size=0)(wide)


def test_attributes_change_what_the_next_call_returns(setup):
    weights, folder, images, labels = setup
    wide = str(folder / list(images)[0])
    d = Detector(weights, conf=CONF, imgsz=IMGSZ)
    every = d(wide).xyxy[0]
    d.max_det = 2
    assert len(d(wide).xyxy[0]) == 2
    d.max_det, d.classes = 1000, [int(every[0, 5])]
    kept = d(wide).xyxy[0]
    assert 0 < len(kept) < len(every) and set(kept[:, 5].tolist()) == {float(every[0, 5])}
    d.classes, d.conf = None, 0.9
    assert len(d(wide).xyxy[0]) < len(every)
    d.classes = [99]
    with pytest.raises(ValueError, match="--classes 99: the model has 6 classes"):
        d(wide)
    d.classes, d.conf, d.device = None, CONF, "cpu"  # reloads the weights
    assert d.device.type == "cpu" and torch.equal(d(wide).xyxy[0], every)


def test_detector_refuses_bad_inputs_naming_them(detector, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such file"):
        detector(str(tmp_path / "missing.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: cannot be decoded"):
        detector([np.zeros((8, 8, 3), np.uint8), str(broken)])
    with pytest.raises(ValueError, match=r"input 0: expected an \(H, W, 3\) uint8 BGR array"):
        detector(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"input 0: expected a \(3, H, W\)"):
        detector(torch.zeros(4, 8, 8))
    with pytest.raises(TypeError, match="input 0: int is not a path"):
        detector(3)
    with pytest.raises(ValueError, match="no input"):
        detector([])


# -- Results ------------------------------------------------------------------------------------------
def _results(names=NAMES) -> Results:
    im0, im1 = np.zeros((100, 200, 3), np.uint8), np.zeros((50, 40, 3), np.uint8)
    d0 = torch.tensor([[10.0, 20.0, 50.0, 60.0, 0.9, 1.0], [0.0, 0.0, 200.0, 100.0, 0.5, 0.0]])
    d1 = torch.zeros(0, 6)
    return Results([im0, im1], [d0, d1], ["a.jpg", "b.png"], names, (1.0, 2.0, 3.0), (1, 3, 64, 128))


def test_results_box_formats():
    r = _results()
    assert torch.equal(r.xyxy[0][0], torch.tensor([10.0, 20.0, 50.0, 60.0, 0.9, 1.0]))
    assert torch.allclose(r.xywh[0][0], torch.tensor([30.0, 40.0, 40.0, 40.0, 0.9, 1.0]))
    assert torch.allclose(r.xyxyn[0][1], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.0]))
    assert torch.allclose(r.xywhn[0][0], torch.tensor([0.15, 0.4, 0.2, 0.4, 0.9, 1.0]))
    assert r.xywhn[1].shape == (0, 6)


def test_results_records_length_iteration_and_indexing():
    r = _results()
    assert r.to_records() == [
        dict(image="a.jpg", xmin=10.0, ymin=20.0, xmax=50.0, ymax=60.0, confidence=pytest.approx(0.9), **{
            "class": 1, "name": "square"}),
        dict(image="a.jpg", xmin=0.0, ymin=0.0, xmax=200.0, ymax=100.0, confidence=0.5, **{
            "class": 0, "name": "circle"})]
    assert len(r) == 2 and [one.files for one in r] == [["a.jpg"], ["b.png"]]
    assert r[-1].files == ["b.png"] and len(r[0].to_records()) == 2
    with pytest.raises(IndexError):
        r[2]


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        _results().to_pandas()


def test_print_shows_one_line_per_image_and_the_speed(capsys):
    _results().print()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["image 1/2 a.jpg: 100x200 1 circle, 1 square",
                     "image 2/2 b.png: 50x40 (no detections)",
                     "Speed: 1.0ms pre-process, 2.0ms inference, 3.0ms NMS per image at shape "
                     "(1, 3, 64, 128)"]


def test_render_draws_on_copies():
    r = _results()
    drawn = r.render()
    assert drawn[0].any() and not r.images[0].any()  # boxes drawn, the original untouched
    assert not drawn[1].any()  # no boxes, nothing drawn


def test_save_writes_annotated_images_and_never_reuses_a_folder(tmp_path):
    r = _results()
    first = r.save(tmp_path / "exp")
    assert first == tmp_path / "exp" and sorted(p.name for p in first.iterdir()) == ["a.jpg", "b.png"]
    assert cv2.imread(str(first / "a.jpg")).any()
    second = r.save(tmp_path / "exp")
    assert second == tmp_path / "exp2" and (second / "b.png").is_file()


def test_crop_uses_detect_py_layout_and_safe_names(tmp_path):
    r = _results(names=["../evil", "square", *NAMES[2:]])
    folder = r.crop(tmp_path / "exp")
    crops = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert len(crops) == 2 and "crops/square/a.jpg" in crops
    evil = next(c for c in crops if c != "crops/square/a.jpg")
    assert evil.startswith("crops/") and ".._evil" in evil and evil.count("/") == 2
    assert not (tmp_path / "evil").exists()
    assert cv2.imread(str(folder / "crops/square/a.jpg")).shape == (51, 51, 3)


# -- torch.hub ----------------------------------------------------------------------------------------
HUB_SCRIPT = """
import json, sys, torch
repo, weights, image = sys.argv[1:]
model = torch.hub.load(repo, "custom", path=weights, source="local", conf={conf}, imgsz={imgsz})
results = model(image)
print(json.dumps(results.xywhn[0].tolist()))
"""


def test_hub_load_custom_from_another_folder_offline(setup, tmp_path):
    weights, folder, images, labels = setup
    wide = list(images)[0]
    script = tmp_path / "user.py"
    script.write_text(HUB_SCRIPT.format(conf=CONF, imgsz=IMGSZ))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "no_proxy": "*",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # any download fails
    if "OMP_NUM_THREADS" in os.environ:  # the same thread count as this process: the same float sums
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    done = subprocess.run([sys.executable, str(script), str(REPO), str(weights), str(folder / wide)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = np.array(json.loads(done.stdout.strip().splitlines()[-1]))[:, [5, 0, 1, 2, 3, 4]]
    np.testing.assert_allclose(_sorted(rows), _sorted(labels[wide]), atol=1e-4, rtol=0)


def test_hub_has_an_entry_point_per_model_yaml():
    import hubconf

    yamls = sorted(p.stem.replace("-", "_") for p in (REPO / "configs" / "models").glob("*.yaml"))
    entries = sorted(n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n)))
    assert entries == sorted([*yamls, "custom"])


def test_hub_entry_points_untrained_and_pretrained(setup):
    weights, folder, images, labels = setup
    untrained = torch.hub.load(str(REPO), "yolov5n", source="local", classes=3)
    assert isinstance(untrained, Detector) and untrained.names == ["0", "1", "2"]
    assert len(untrained(np.zeros((64, 64, 3), np.uint8))) == 1
    bare = torch.hub.load(str(REPO), "yolov5n", source="local", autoshape=False)
    assert isinstance(bare, DetectionModel) and not bare.training and bare.nc == 80
    wide = list(images)[0]
    pretrained = torch.hub.load(str(REPO), "yolov5n", source="local", pretrained=str(weights), conf=CONF,
                                imgsz=IMGSZ)
    _assert_same_as_detect(pretrained(str(folder / wide)), [labels[wide]])
    with pytest.raises(ValueError, match="was trained from yolov5n.yaml, not yolov5s.yaml"):
        torch.hub.load(str(REPO), "yolov5s", source="local", pretrained=str(weights))
