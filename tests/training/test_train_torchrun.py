"""`qcompress train` under torchrun: two gloo processes train data-parallel; rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import sys

from qcompress.core.checkpoints import load_detector
from qcompress.data.synthetic import generate_voc_dataset


def test_train_under_torchrun_two_processes(tmp_path):
    data = generate_voc_dataset(tmp_path / "voc", num_images=8)
    out, reports = tmp_path / "ddp.pth", tmp_path / "reports"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "qcompress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "2", "--limit", "4",
        "--eval-limit", "2", "--workers", "0", "--out", str(out), "--out-dir", str(reports),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("saved ") == 1  # rank 0 alone saves and reports
    assert len(list(reports.glob("train-*.json"))) == 1
    assert load_detector(out).class_names[0] == "BACKGROUND"
