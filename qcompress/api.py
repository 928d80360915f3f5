"""The public library surface: each command's frozen Config, its Result and the function that runs it.

A thin facade over :mod:`qcompress.jobs` (one module per command) and :mod:`qcompress.core` (what the
jobs share). Every function takes a config and an optional ``progress(description, total) -> advance``
callback, writes its JSON + Markdown report and returns ``(result, report)``; nothing here prints.

>>> from qcompress import api
>>> result, report = api.quantize(api.QuantizeJobConfig())  # doctest: +SKIP
"""

from __future__ import annotations

from qcompress.core import (
    DataConfig,
    EvalResult,
    ModelConfig,
    Progress,
    calibration_batches,
    evaluate_detector,
    evaluate_fidelity,
    load_dataset,
    load_model,
    no_progress,
)
from qcompress.jobs.bench import BenchConfig, BenchResult, CompareConfig, CompareResult, bench, compare
from qcompress.jobs.evaluate import EvalConfig, evaluate
from qcompress.jobs.export import ExportConfig, export
from qcompress.jobs.prune import PruneJobConfig, PruneResult, prune
from qcompress.jobs.qat import QATJobConfig, QATResult, qat
from qcompress.jobs.quantize import QuantizeJobConfig, QuantizeResult, quantize, recipe_table
from qcompress.jobs.report import ReportConfig, ReportResult, report
from qcompress.jobs.train import TrainJobConfig, train

__all__ = [
    "BenchConfig",
    "BenchResult",
    "CompareConfig",
    "CompareResult",
    "DataConfig",
    "EvalConfig",
    "EvalResult",
    "ExportConfig",
    "ModelConfig",
    "Progress",
    "PruneJobConfig",
    "PruneResult",
    "QATJobConfig",
    "QATResult",
    "QuantizeJobConfig",
    "QuantizeResult",
    "ReportConfig",
    "ReportResult",
    "TrainJobConfig",
    "bench",
    "calibration_batches",
    "compare",
    "evaluate",
    "evaluate_detector",
    "evaluate_fidelity",
    "export",
    "load_dataset",
    "load_model",
    "no_progress",
    "prune",
    "qat",
    "quantize",
    "recipe_table",
    "report",
    "train",
]
