"""Where the embedded default checkpoint and the generated default dataset live."""

from __future__ import annotations

from pathlib import Path

from qcompress.errors import QCompressError

# Outputs go where the user runs qcompress (relative paths, like eval_results/); the embedded default
# ships inside the package, so a wheel install has it too.
TRAINED_MODELS = Path("trained_models")
DEFAULT_MODEL_NAME = "mb2-ssd-lite-synth"
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / f"{DEFAULT_MODEL_NAME}.pth"
DEFAULT_REPORTS = Path("eval_results")


def default_model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise QCompressError(
            f"the embedded default checkpoint is missing: {DEFAULT_MODEL}",
            "reinstall qcompress (the wheel ships it), or pass --model-path",
        )
    return DEFAULT_MODEL
