"""Option types every command spells the same way (Typer ``Annotated`` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelPath = Annotated[
    Path | None, typer.Option("--model-path", "-m", help="Checkpoint (.pth), or embedded:NAME for one shipped in the package (see `qcompress models`). Default: the embedded default model.")
]
Arch = Annotated[str | None, typer.Option(help="Architecture (see `qcompress models`). Default: from the sidecar, else mb2-ssd-lite.")]
Labels = Annotated[Path | None, typer.Option(help="Labels file, one class per line (pytorch-ssd style, BACKGROUND first).")]
InputSize = Annotated[
    int | None, typer.Option(help="Input size for checkpoints without a sidecar (e.g. 320 or 640 for ultralight-*).")
]
DatasetKind = Annotated[str, typer.Option("--dataset", help="voc or coco.")]
DataDir = Annotated[Path | None, typer.Option(help="VOCdevkit / VOC year folder, or COCO image folder. Default: the generated dataset.")]
Split = Annotated[str, typer.Option(help="VOC image set to evaluate on.")]
Ann = Annotated[Path | None, typer.Option(help="COCO instances json (default: the only .json in --data).")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N images.")]
Seed = Annotated[int, typer.Option(min=0, help="Random seed (>= 0): every command is deterministic given it.")]
PseudoLabels = Annotated[
    float | None,
    typer.Option(help="Unlabelled images: use the fp32 parent's detections with score >= this as labels "
                      "(train and evaluate = fidelity AP). The first --limit images evaluate, the rest train."),
]
ReportName = Annotated[str | None, typer.Option(help="Report file name (without extension) in --out-dir.")]
OutDir = Annotated[Path, typer.Option(help="Folder for the JSON + Markdown reports.")]
Runtime = Annotated[
    str | None,
    typer.Option(help="Where the model runs: torch (.pth), onnxruntime or openvino (.onnx from `qcompress export`). "
                      "Default: by file type."),
]
Threads = Annotated[int | None, typer.Option(help="Intra-op threads (torch or ONNX Runtime). Default: the library's.")]
Teacher = Annotated[
    str | None,
    typer.Option(help="Distil from a teacher: 'parent' (the float parent) or a float checkpoint with the same "
                      "classes. Fine-grained feature imitation near objects (Wang et al. 2019), see --imitation."),
]
IMITATION_WEIGHT = 0.01  # = training.distill.DistillConfig.imitation (not imported here: the CLI starts without torch)
Imitation = Annotated[float, typer.Option(help="With --teacher: weight lambda of the feature-imitation loss (Wang et "
                                               "al.'s squared difference summed over channels / 2 N_p; 0: off).")]
Psi = Annotated[float, typer.Option(help="With --teacher: IoU ratio of the imitation mask (the paper's 0.5).")]
DistillOutputs = Annotated[
    float, typer.Option(help="With --teacher: weight of output distillation (class KL + box offsets; 0: off).")
]
Temperature = Annotated[float, typer.Option(help="With --teacher: softmax temperature of output distillation.")]
