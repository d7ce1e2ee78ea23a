"""User errors of the five scripts read as one message with a non-zero exit code and no traceback;
--verbose or VITDET_TRACEBACK=1 shows the traceback; a real bug keeps its traceback (engine/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import TRACEBACK_ENV, run_cli

REPO = Path(__file__).resolve().parents[1]
MODEL_NO_DEPTH = "nc: 3\nbackbone: [[-1, 1, FastViT, [sa12]]]\nhead: []\n"
MODEL_UNKNOWN_BACKBONE = ("nc: 3\ndepth_multiple: 1.0\nwidth_multiple: 1.0\nanchors: 3\n"
                          "backbone: [[-1, 1, NoSuchViT, [s12]]]\n"
                          "head: [[[2, 3, 4], 1, Detect, [nc, anchors]]]\n")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    hyp = (REPO / "configs" / "hyps" / "hyp.scratch-low.yaml").read_text()
    (folder / "hyp.yaml").write_text(hyp.replace("momentum: 0.937", "momentum: fast", 1))
    assert "momentum: fast" in (folder / "hyp.yaml").read_text()
    (folder / "data.yaml").write_text("train: images/train\nnames: [a]\n")  # no val
    (folder / "model.yaml").write_text(MODEL_NO_DEPTH)
    (folder / "unknown.yaml").write_text(MODEL_UNKNOWN_BACKBONE)
    (folder / "garbage.pt").write_bytes(b"not a checkpoint")
    (folder / "empty").mkdir()
    return folder


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


CASES = {  # name: (arguments with {b} = the bad-inputs folder, {ckpt} = a checkpoint, words in the message)
    "train bad hyp": (["train.py", "--cfg", "yolov5n.yaml", "--hyp", "{b}/hyp.yaml"], "momentum"),
    "train bad data YAML": (["train.py", "--cfg", "yolov5n.yaml", "--data", "{b}/data.yaml"],
                            "missing 'val'"),
    "train unknown backbone": (["train.py", "--cfg", "{b}/unknown.yaml"], "NoSuchViT"),
    "val missing data YAML": (["val.py", "--weights", "{ckpt}", "--data", "{b}/nope.yaml"], "nope"),
    "detect source without frames": (["detect.py", "--weights", "{ckpt}", "--source", "{b}/empty"],
                                     "no images"),
    "export not a checkpoint": (["export.py", "--weights", "{b}/garbage.pt", "--include", "onnx"],
                                "not a checkpoint"),
    "benchmarks bad model YAML": (["benchmarks.py", "--cfg", "{b}/model.yaml", "--out", "{b}/bench"],
                                  "depth_multiple"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_message_without_traceback(case, bad_inputs, tiny_checkpoint, tmp_path):
    args, words = CASES[case]
    args = [a.format(b=bad_inputs, ckpt=tiny_checkpoint) for a in args]
    if args[0] in ("train.py", "val.py", "detect.py"):
        args += ["--project", str(tmp_path / "runs")]
    done = _run(args, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and words in output, output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.slow
def test_bad_arguments_and_verbose(bad_inputs, tmp_path):
    bad_flag = _run(["train.py", "--cfg", "yolov5n.yaml", "--epochs", "many"], tmp_path)
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr and "--epochs" in bad_flag.stderr
    hyp = ["train.py", "--cfg", "yolov5n.yaml", "--hyp", f"{bad_inputs}/hyp.yaml", "--project", str(tmp_path)]
    verbose = _run([*hyp, "--verbose"], tmp_path)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "HypError" in verbose.stderr
    caught_by_val = _run(["val.py", "--weights", f"{bad_inputs}/missing.pt", "--project", str(tmp_path)],
                         tmp_path, env={TRACEBACK_ENV: "1"})
    assert caught_by_val.returncode != 0 and "Traceback" in caught_by_val.stderr


def test_run_cli_exit_codes_and_real_bugs(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    seen = []

    def ok(argv):
        seen.append(argv)
        return 0

    with pytest.raises(SystemExit) as end:
        run_cli(ok, ["--x", "1", "--verbose"])
    assert end.value.code == 0 and seen == [["--x", "1"]]  # --verbose is taken out
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def user_error(argv):
        raise FileNotFoundError("data.yaml: not found")

    with pytest.raises(SystemExit) as end:
        run_cli(user_error, [])
    err = capsys.readouterr().err
    assert end.value.code == 1 and "data.yaml: not found" in err and err.count("\n") == 1

    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):  # a real bug: the traceback is kept
        run_cli(bug, [])
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError):
        run_cli(user_error, [])
