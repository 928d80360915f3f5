"""QAT under torchrun: two gloo processes on CPU train a few steps with DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qcompress.core.checkpoints import load_detector
from qcompress.data.synthetic import generate_voc_dataset


def test_torchrun_two_processes_train_in_sync(small_checkpoint, tmp_path):
    data = generate_voc_dataset(tmp_path / "voc", num_images=8)
    out, reports = tmp_path / "ddp.pth", tmp_path / "reports"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "qcompress", "qat", "-m", str(small_checkpoint), "--data", str(data),
        # 4 training images over 2 ranks, batch 1: 2 steps per rank; BN frozen from the start
        # (batch statistics of one image at 1x1 resolution are undefined)
        "--epochs", "1", "--batch-size", "1", "--train-limit", "4", "--freeze-bn-epoch", "0",
        "--limit", "1", "--calib-images", "2", "--no-ptq", "--workers", "0", "--runs", "2",
        "--out", str(out), "--out-dir", str(reports), "--report-name", "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((reports / "ddp.json").read_text())
    assert report["world_size"] == 2
    assert report["train_steps"] == 2  # rank 0's shard: half of the 4 images
    assert report["param_divergence"] == 0.0  # gradients were averaged: replicas stayed identical
    assert report["recipe"]["world_size"] == 2
    assert run.stdout.count("saved ") == 1  # rank 0 alone saves and reports
    assert load_detector(out).source["sidecar"]["quantization"]["qat"] is True
