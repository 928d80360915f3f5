"""Where the embedded default checkpoint and the generated default dataset live."""

from __future__ import annotations

from pathlib import Path

from qcompress.errors import QCompressError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAINED_MODELS = PROJECT_ROOT / "trained_models"
DEFAULT_MODEL_NAME = "mb2-ssd-lite-synth"
DEFAULT_MODEL = TRAINED_MODELS / f"{DEFAULT_MODEL_NAME}.pth"
DEFAULT_REPORTS = Path("eval_results")


def default_model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise QCompressError(
            f"the embedded default checkpoint is missing: {DEFAULT_MODEL}",
            "reinstall from a full clone, run `qcompress train`, or pass --model-path",
        )
    return DEFAULT_MODEL
