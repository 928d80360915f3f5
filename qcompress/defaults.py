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
WEIGHTS = DEFAULT_MODEL.parent
EMBEDDED_PREFIX = "embedded:"  # --model-path embedded:NAME = a checkpoint shipped in the package


def default_model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise QCompressError(
            f"the embedded default checkpoint is missing: {DEFAULT_MODEL}",
            "reinstall qcompress (the wheel ships it), or pass --model-path",
        )
    return DEFAULT_MODEL


def embedded_models() -> list[str]:
    """Names of the checkpoints shipped in the package (``--model-path embedded:NAME``)."""
    return sorted(p.stem for p in WEIGHTS.glob("*.pth") if p.with_suffix(".json").is_file())


def embedded_model_path(name: str) -> Path:
    path = WEIGHTS / f"{name}.pth"
    if name not in embedded_models():
        raise QCompressError(f"no embedded checkpoint named {name!r}",
                             f"use one of: {', '.join(EMBEDDED_PREFIX + n for n in embedded_models())}")
    return path
