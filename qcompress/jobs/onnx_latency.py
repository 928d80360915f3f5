"""Latency of a job's models in torch eager and, exported to ONNX, in ONNX Runtime, timed in one round-robin.

``quantize`` and ``prune`` report what their output costs where users deploy it: each model is exported
with :func:`qcompress.runtime.onnx_export.export_onnx` to a temporary ``.onnx`` (verified there against
the torch model), loaded with :func:`qcompress.runtime.onnxruntime.load_onnx_detector`, and timed with
:func:`qcompress.bench.latency.interleaved_latency` together with the eager networks, so that a burst of
load on the machine lands on every row alike. A model the exporter refuses is recorded as
``"not exportable: <reason>"`` instead of a latency.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompress.bench.latency import LatencyStats, interleaved_latency
from qcompress.errors import QCompressError
from qcompress.models.detector import Detector

NOT_EXPORTABLE = "not exportable"


@dataclass
class EagerAndOnnxLatency:
    """Latencies of the same models in torch eager (``eager``) and ONNX Runtime (``onnx``).

    ``onnx[i]``: the stats of model ``i`` in ONNX Runtime, ``"not exportable: <reason>"``, or None when
    the ONNX measurement was switched off.
    """

    eager: list[LatencyStats]
    onnx: list[LatencyStats | str | None]
    torch_threads: int
    onnx_threads: int | None = None
    onnxruntime_version: str | None = None
    exports: list[dict[str, Any] | None] = field(default_factory=list)

    def onnx_json(self, i: int) -> dict[str, Any] | str | None:
        """JSON value of ``onnx[i]``: the latency dict with runtime and threads, the refusal, or None."""
        value = self.onnx[i]
        if isinstance(value, LatencyStats):
            return {**value.as_dict(), "runtime": f"onnxruntime {self.onnxruntime_version}",
                    "intra_op_threads": self.onnx_threads, "export": self.exports[i]}
        return value

    def timed_onnx(self) -> list[LatencyStats]:
        """The ONNX Runtime latencies that were measured."""
        return [v for v in self.onnx if isinstance(v, LatencyStats)]

    def describe(self) -> str:
        """Which runtime each latency row is, with the thread counts."""
        text = f"Rows marked torch eager: PyTorch eager mode, {self.torch_threads} torch thread(s)."
        if any(v is not None for v in self.onnx):
            text += (f" Rows marked ONNX Runtime: the same networks exported to ONNX (int8 as a QDQ graph carrying "
                     f"our scales) and run by onnxruntime {self.onnxruntime_version} on its CPU execution provider, "
                     f"{self.onnx_threads} intra-op thread(s); pre-processing and decoding excluded in both. "
                     "All rows were timed interleaved in one round-robin.")
        return text


def _reason(exc: QCompressError) -> str:
    return f"{NOT_EXPORTABLE}: {exc.message}"


def eager_and_onnx_latency(
    detectors: Sequence[Detector],
    sample: torch.Tensor,
    *,
    engines: Sequence[str | None],
    recipes: Sequence[Mapping[str, Any] | None] | None = None,
    runs: int = 20,
    threads: int | None = None,
    seed: int = 0,
    onnx: bool = True,
    onnx_threads: int = 1,
) -> EagerAndOnnxLatency:
    """Batch-1 latency of ``detectors`` in torch eager and (``onnx``) in ONNX Runtime, all interleaved.

    ``sample``: a few preprocessed images the exports are verified on. ``engines[i]``: the quantized engine
    of detector ``i`` (None for float). ``recipes[i]``: the quantization recipe recorded in its export.
    ``threads``: torch threads (None: unchanged); ``onnx_threads``: ONNX Runtime intra-op threads.
    """
    recipes = list(recipes) if recipes is not None else [None] * len(detectors)
    h, w = detectors[0].spec.input_size
    with tempfile.TemporaryDirectory(prefix="qcompress-ort-latency-") as tmp:
        networks: list[torch.nn.Module | None] = []
        onnx_results: list[LatencyStats | str | None] = []
        exports: list[dict[str, Any] | None] = []
        version = None
        if onnx:
            from qcompress._warnings import quiet_torch_ao
            from qcompress.runtime.onnx_export import export_onnx
            from qcompress.runtime.onnxruntime import load_onnx_detector

            for i, (detector, engine, recipe) in enumerate(zip(detectors, engines, recipes, strict=True)):
                path = Path(tmp) / f"model{i}.onnx"
                try:
                    with quiet_torch_ao():
                        record = export_onnx(detector, path, sample, recipe=recipe, backend=engine)
                    networks.append(load_onnx_detector(path, threads=onnx_threads).model)
                    onnx_results.append(None)
                    exports.append({"precision": record.precision, "size_bytes": record.size_bytes,
                                    "int8_kernels": record.int8_kernels, "float_kernels": record.float_kernels})
                except QCompressError as exc:
                    networks.append(None)
                    onnx_results.append(_reason(exc))
                    exports.append(None)
            if any(n is not None for n in networks):
                import onnxruntime

                version = onnxruntime.__version__
        else:
            networks = [None] * len(detectors)
            onnx_results = [None] * len(detectors)
            exports = [None] * len(detectors)
        timed = [n for n in networks if n is not None]
        models = [d.model for d in detectors] + timed
        stats = interleaved_latency(models, (1, 3, h, w), runs=runs, threads=threads, seed=seed,
                                    engines=list(engines) + [None] * len(timed))
        eager, rest = stats[: len(detectors)], iter(stats[len(detectors):])
        for i, network in enumerate(networks):
            if network is not None:
                onnx_results[i] = next(rest)
    return EagerAndOnnxLatency(eager=eager, onnx=onnx_results, torch_threads=eager[0].threads,
                               onnx_threads=onnx_threads if onnx else None, onnxruntime_version=version,
                               exports=exports)


def onnx_rows(timing: EagerAndOnnxLatency) -> list[list[Any]]:
    """Table rows "latency median / p90 ms, ONNX Runtime" for two models (first = reference): value, value,
    ratio; a model that could not be exported shows its reason."""
    if all(v is None for v in timing.onnx):
        return []
    first, second = timing.onnx[0], timing.onnx[1]
    rows = []
    for title, key in (("latency median ms, ONNX Runtime", "median_ms"), ("latency p90 ms, ONNX Runtime", "p90_ms")):
        values = [getattr(v, key) if isinstance(v, LatencyStats) else (v or "–") for v in (first, second)]
        both = all(isinstance(v, float) for v in values)
        rows.append([title, *values, values[1] / values[0] if both and values[0] else float("nan")])
    return rows


def latency_cells(values: Sequence[Any]) -> list[str]:
    """``[first ms, second ms, ratio]`` of an :func:`onnx_rows` row as short strings for a console table."""
    import math

    first, second, ratio = values
    cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in (first, second)]
    return [*cells, "–" if math.isnan(ratio) else f"{ratio:.3f}"]


__all__ = ["NOT_EXPORTABLE", "EagerAndOnnxLatency", "eager_and_onnx_latency", "latency_cells", "onnx_rows"]
