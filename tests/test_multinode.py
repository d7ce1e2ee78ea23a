"""Two-node torchrun on one machine: two launchers (node ranks 0 and 1, one process each) meet over the
loopback with gloo. Both processes have LOCAL_RANK 0, so only the global RANK may decide who writes."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.callbacks import result_columns
from engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# what a one-node run with these flags writes (tests/test_train.py compares the full one-node layout)
ONE_NODE_LAYOUT = ["events", "hyp.yaml", "opt.yaml", "results.csv", "weights", "weights/best.pt", "weights/last.pt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(node_rank: int, port: int, train_args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node",
                "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.Popen([sys.executable, *launcher, "train.py", *train_args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _layout(run: Path) -> list[str]:
    names = (p.relative_to(run).as_posix() for p in run.rglob("*"))
    return sorted("events" if n.startswith("events.out.tfevents.") else n for n in names)


@pytest.mark.slow
def test_two_nodes_train_and_write_one_set_of_run_files(tmp_path, tiny_data):
    args = ["--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch-size",
            "8", "--workers", "0", "--noautoanchor", "--noplots", "--device", "cpu", "--project", str(tmp_path),
            "--name", "exp"]
    port = _free_port()
    nodes = [_node(k, port, args) for k in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    for k, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {k}:\n{out[-4000:]}"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # node 1 made no run folder of its own
    run = tmp_path / "exp"
    assert _layout(run) == ONE_NODE_LAYOUT
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["opt"]["batch_size"] == 8
    assert not any(k.startswith("module.") for k in ckpt["model"])
    with open(run / "results.csv") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == result_columns(len(ckpt["optimizer"]["param_groups"])) and len(rows) == 2
    assert "Results saved to" in outputs[0] and "Results saved to" not in outputs[1]  # rank 0 alone reports
