"""Export a detector's network to ONNX, check it in ONNX Runtime, and write its JSON sidecar.

What is exported is ``detector.model``: normalised images ``(N, 3, h, w)`` float32 (input ``images``,
NCHW, dynamic batch) -> raw head outputs. Pre-processing (resize, ``(x - mean) / std``) and decoding
+ NMS stay in qcompress; the sidecar says how to do them, and
:func:`qcompress.runtime.onnxruntime.load_onnx_detector` does them with the same code as the torch
:class:`~qcompress.models.detector.Detector`.

- float (also pruned) networks export as they are (TorchScript exporter, opset 17);
- eager int8 networks export as a QDQ graph built from a float twin (:mod:`qcompress.runtime.qdq`)
  that carries our int8 weights, weight scales and calibrated activation scales: ONNX Runtime fuses it
  into ``QLinearConv`` / ``QLinearAdd`` kernels. It is not calibrated again.

Every export checks itself: ONNX Runtime runs the file on the sample batch and the output SQNR
against our torch model (float, or eager int8) must reach a floor, else :class:`QCompressError`
and nothing is written. The sidecar beside ``model.onnx`` is ``model.onnx.json`` (not
``model.json``, which would collide with the sidecar of a ``model.pth`` in the same folder).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path, read_json, sha256_file, write_json_atomic
from qcompress.models.detector import Detector, PostprocessConfig
from qcompress.quant.sqnr import sqnr_db
from qcompress.runtime.qdq import is_eager_int8, qdq_twin, quantized_engine

ONNX_SIDECAR_FORMAT = "qcompress-onnx/1"
INPUT_NAME = "images"
DEFAULT_OPSET = 17
# Output SQNR floors (dB) of the ONNX Runtime result against our own torch model on the sample.
FLOAT_MIN_SQNR_DB = 50.0
INT8_MIN_SQNR_DB = 20.0

# Operators of ONNX Runtime's optimized graph that compute in integers.
INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "MatMulInteger",
        "QLinearMatMul",
        "QGemm",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearLeakyRelu",
        "QLinearSigmoid",
        "QLinearSoftmax",
    }
)
FLOAT_CONVS = frozenset({"Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul"})


def onnx_sidecar_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def describe_preprocessing(detector: Detector) -> dict[str, Any]:
    """How an image becomes the ``images`` input, as the detector declares it (for the sidecar)."""
    h, w = detector.spec.input_size
    return {
        "from": "uint8 RGB image, (H, W, 3)",
        "resize": f"bilinear (align_corners=False) to {h}x{w} (height x width), aspect ratio not kept",
        "normalize": "(x - mean) / std, per channel, on 0..255 values",
        "mean": list(detector.spec.mean),
        "std": detector.spec.std,
        "to": f"float32 NCHW (N, 3, {h}, {w}), input name {INPUT_NAME!r}",
    }


@dataclass(frozen=True)
class OnnxSidecar:
    """The JSON beside an exported ``.onnx``: enough to run it as a detector and to trace its origin."""

    arch: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: float
    options: dict[str, Any]
    preprocessing: dict[str, Any]
    input_name: str
    input_layout: str
    output_names: tuple[str, ...]
    precision: str  # "float32" or "int8-qdq"
    quantization: dict[str, Any] | None  # our recipe + how it is expressed in the graph
    postprocess: dict[str, Any]
    onnx_sha256: str
    parent_sha256: str | None
    opset: int
    verification: dict[str, Any]
    versions: dict[str, str]
    created: str
    command: tuple[str, ...] = ()
    format: str = ONNX_SIDECAR_FORMAT

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": data.pop("format"), **data}

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> OnnxSidecar:
        """Validate a parsed sidecar; :class:`QCompressError` names the first problem."""
        hint = "re-export the model with qcompress"
        if not isinstance(data, Mapping):
            raise QCompressError(f"ONNX sidecar {source} is not a JSON object", hint)
        if data.get("format") != ONNX_SIDECAR_FORMAT:
            raise QCompressError(
                f"ONNX sidecar {source} has format {data.get('format')!r}, expected {ONNX_SIDECAR_FORMAT!r}",
                hint,
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"format"})
        if missing:
            raise QCompressError(f"ONNX sidecar {source} lacks {', '.join(missing)}", hint)
        checks = {
            "arch": isinstance(data["arch"], str),
            "class_names": isinstance(data["class_names"], list)
            and len(data["class_names"]) >= 2
            and all(isinstance(c, str) for c in data["class_names"]),
            "input_size": _ints(data["input_size"], 2),
            "mean": isinstance(data["mean"], list) and len(data["mean"]) == 3,
            "std": isinstance(data["std"], (int, float)) and data["std"] > 0,
            "options": isinstance(data["options"], dict),
            "input_name": isinstance(data["input_name"], str),
            "output_names": isinstance(data["output_names"], list) and bool(data["output_names"]),
            "precision": data["precision"] in ("float32", "int8-qdq"),
            "postprocess": isinstance(data["postprocess"], dict)
            and set(data["postprocess"]) <= {f.name for f in fields(PostprocessConfig)},
            "onnx_sha256": isinstance(data["onnx_sha256"], str) and len(data["onnx_sha256"]) == 64,
            "opset": isinstance(data["opset"], int),
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise QCompressError(f"ONNX sidecar {source} has invalid {', '.join(bad)}", hint)
        values = {name: data[name] for name in names if name in data}
        values.setdefault("command", ())
        for key in ("class_names", "input_size", "mean", "output_names", "command"):
            values[key] = tuple(values[key])
        return cls(**values)


def _ints(value: Any, length: int) -> bool:
    return (
        isinstance(value, list) and len(value) == length and all(isinstance(v, int) and v > 0 for v in value)
    )


def read_onnx_sidecar(onnx_path: Path) -> OnnxSidecar:
    """The validated sidecar of ``onnx_path``."""
    path = onnx_sidecar_path(onnx_path)
    return OnnxSidecar.from_dict(read_json(path, "ONNX sidecar"), path)


@dataclass
class ExportRecord:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    sidecar_path: Path
    precision: str
    opset: int
    input_name: str
    output_names: list[str]
    reference: str  # what the ONNX Runtime outputs were compared with
    sqnr_db: list[float]  # per output
    min_sqnr_db: float  # the floor that was required
    verified_images: int
    int8_kernels: dict[str, int]  # integer operators in ONNX Runtime's optimized graph
    float_kernels: dict[str, int]  # convolutions / matmuls left in float there
    size_bytes: int
    seconds: float
    twin: dict[str, Any] | None = None  # int8 export: layers and quantization points carried over
    # int8: SQNR against our recipe evaluated in float arithmetic (the twin in torch). Two int8 engines
    # round a few values differently and deep networks amplify that, so this is the tighter check.
    recipe_sqnr_db: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"], data["sidecar_path"] = str(self.path), str(self.sidecar_path)
        data["sqnr_db"] = [_json_float(v) for v in self.sqnr_db]
        if self.recipe_sqnr_db is not None:
            data["recipe_sqnr_db"] = [_json_float(v) for v in self.recipe_sqnr_db]
        return data


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def library_versions() -> dict[str, str]:
    """Versions of what produced and checked the file, and the machine."""
    import platform

    import numpy

    from qcompress import __version__

    found = {
        "qcompress": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()}",
    }
    for name in ("torchvision", "onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            found[name] = __import__(name).__version__
    return found


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if _module_missing(name)]
    if missing:
        raise QCompressError(f"ONNX export needs {' and '.join(missing)}", "pip install onnx onnxruntime")


def _module_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def _as_outputs(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise QCompressError(
        f"this network returns {type(value).__name__}, not tensors",
        "ONNX export covers networks whose raw outputs are tensors (the SSD family); torchvision detectors "
        "decode and run NMS inside their forward",
    )


def _check_sample(detector: Detector, sample: torch.Tensor) -> torch.Tensor:
    h, w = detector.spec.input_size
    if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or tuple(sample.shape[1:]) != (3, h, w):
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise QCompressError(
            f"the export sample must be a preprocessed batch (N, 3, {h}, {w}), got {shape}",
            "stack detector.preprocess(image) of a few images",
        )
    return sample.detach().float().contiguous()


def _recipe(detector: Detector, recipe: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if recipe is not None:
        return dict(recipe)
    sidecar = (getattr(detector, "source", None) or {}).get("sidecar") or {}
    found = sidecar.get("quantization")
    return dict(found) if isinstance(found, Mapping) else None


def _torch_export(
    model: nn.Module, sample: torch.Tensor, path: Path, output_names: Sequence[str], opset: int
) -> None:
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated
            torch.onnx.export(
                model,
                (sample[:1],),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QCompressError(
            f"torch.onnx.export failed: {reason[:300]}", "export the float model, or report the layer"
        ) from None


def _tag(path: Path, detector: Detector, precision: str) -> None:
    """Check the file and record what it is in its metadata (``onnx.checker`` + metadata_props)."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.producer_name = "qcompress"
    from qcompress import __version__

    model.producer_version = __version__
    for key, value in {
        "qcompress.format": ONNX_SIDECAR_FORMAT,
        "qcompress.arch": detector.spec.arch,
        "qcompress.precision": precision,
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def ort_session(path: Path, threads: int | None = 1, optimized_path: Path | None = None):
    """A CPU ONNX Runtime session: all graph optimizations, sequential execution, ``threads`` intra-op threads
    (None: ONNX Runtime's default); ``optimized_path`` receives the optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warning about saving NCHWc-optimized graphs is expected here
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_counts(optimized_path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(integer operators, float conv/matmul operators) of an optimized ONNX graph, by op type."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(optimized_path)).graph.node)
    int8 = {op: n for op, n in sorted(ops.items()) if op in INT8_KERNELS}
    floats = {op: n for op, n in sorted(ops.items()) if op in FLOAT_CONVS}
    return int8, floats


def export_onnx(
    detector: Detector,
    path: Path,
    sample: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    output_names: Sequence[str] | None = None,
    min_sqnr_db: float | None = None,
    recipe: Mapping[str, Any] | None = None,
    parent_sha256: str | None = None,
    backend: str | None = None,
) -> ExportRecord:
    """Write ``detector.model`` to ``path`` as ONNX (QDQ int8 for an eager int8 network), verify it in ONNX
    Runtime against the torch model on ``sample``, and write the sidecar ``<path>.json``.

    ``sample``: a few preprocessed images ``(N, 3, h, w)``; the first one is traced, all are verified.
    ``min_sqnr_db``: the output SQNR floor (default 50 dB float, 20 dB int8 against our eager int8).
    ``recipe``: the quantization recipe to record (default: the one in the detector's checkpoint sidecar).
    ``parent_sha256``: the checkpoint the network comes from (default: the file the detector was loaded from).
    ``backend``: quantized engine for the eager reference (default: the recipe's, else the current one).
    Nothing is written when the check fails.
    """
    _require_onnx()
    started = time.perf_counter()
    path = Path(path)
    source = getattr(detector, "source", None) or {}
    if source.get("path") and path.resolve() == Path(source["path"]).resolve():
        raise QCompressError(
            f"refusing to overwrite the input checkpoint {path}", "choose another output path"
        )
    sample = _check_sample(detector, sample)
    model = detector.model.eval()
    int8 = is_eager_int8(model)
    recipe_used = _recipe(detector, recipe) if int8 else None
    backend = backend or (recipe_used or {}).get("backend")
    with quantized_engine(backend), torch.inference_mode():
        reference = _as_outputs(model(sample))
    names = tuple(output_names) if output_names else tuple(f"output{i}" for i in range(len(reference)))
    if len(names) != len(reference):
        raise QCompressError(
            f"{len(names)} output names for {len(reference)} outputs", "pass one name per output"
        )
    twin_summary = None
    recipe_outputs: tuple[torch.Tensor, ...] | None = None
    if int8:
        with quantized_engine(backend):
            export_model, twin = qdq_twin(model, sample[:1])
        with torch.inference_mode():
            recipe_outputs = _as_outputs(export_model(sample))
        twin_summary = {
            "int8_convs": twin.int8_convs,
            "int8_linears": twin.int8_linears,
            "activation_qdq_points": twin.activation_points,
            "float_layers": twin.float_layers,
            "weights": sorted(twin.weight_granularity),
        }
    else:
        export_model = model
    precision = "int8-qdq" if int8 else "float32"
    floor = min_sqnr_db if min_sqnr_db is not None else (INT8_MIN_SQNR_DB if int8 else FLOAT_MIN_SQNR_DB)
    reference_name = (
        f"torch eager int8 ({backend or torch.backends.quantized.engine})" if int8 else "torch float32"
    )

    with tempfile.TemporaryDirectory(prefix="qcompress-onnx-") as tmp:
        draft = Path(tmp) / "model.onnx"
        _torch_export(export_model, sample, draft, names, opset)
        _tag(draft, detector, precision)
        optimized = Path(tmp) / "optimized.onnx"
        try:
            session = ort_session(draft, threads=1, optimized_path=optimized)
            outputs = session.run(list(names), {INPUT_NAME: sample.numpy()})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise QCompressError(
                f"ONNX Runtime cannot run the exported model: {str(exc)[:300]}",
                "report the architecture and the layer named in the message",
            ) from None
        pairs = zip(reference, outputs, strict=True)
        sqnr = [sqnr_db(ref.float(), torch.from_numpy(out).float()) for ref, out in pairs]
        recipe_sqnr = None
        if recipe_outputs is not None:
            pairs = zip(recipe_outputs, outputs, strict=True)
            recipe_sqnr = [sqnr_db(ref.float(), torch.from_numpy(out).float()) for ref, out in pairs]
        int8_kernels, float_kernels = kernel_counts(optimized)
        if min(sqnr) < floor:
            raise QCompressError(
                f"the ONNX model does not reproduce the {reference_name} model: output SQNR "
                f"{', '.join(f'{v:.1f}' for v in sqnr)} dB < {floor:.0f} dB",
                "nothing was written; report the architecture and recipe",
            )
        notes = []
        if int8 and not int8_kernels:
            notes.append("ONNX Runtime did not fuse any integer kernel: the graph runs in float")
        with atomic_path(path) as tmp_path:
            tmp_path.write_bytes(draft.read_bytes())
    onnx_sha = sha256_file(path)
    quantization = None
    if int8:
        quantization = {
            "recipe": recipe_used,
            "graph": "QDQ: our calibrated scale / zero point at each eager quantization point, our int8 "
            "weights and scales, int32 biases at input_scale * weight_scale",
            "weights": twin_summary["weights"] if twin_summary else [],
            "activations": "uint8 per-tensor; x86 keeps its reduce_range scales, saturating at 0/255",
        }
    sidecar = OnnxSidecar(
        arch=detector.spec.arch,
        class_names=tuple(detector.spec.class_names),
        input_size=tuple(detector.spec.input_size),
        mean=tuple(detector.spec.mean),
        std=float(detector.spec.std),
        options=dict(detector.spec.options),
        preprocessing=describe_preprocessing(detector),
        input_name=INPUT_NAME,
        input_layout="NCHW",
        output_names=names,
        precision=precision,
        quantization=quantization,
        postprocess=asdict(detector.postprocess_config),
        onnx_sha256=onnx_sha,
        parent_sha256=parent_sha256 or source.get("sha256"),
        opset=opset,
        verification={
            "reference": reference_name,
            "images": int(sample.shape[0]),
            "sqnr_db": [_json_float(v) for v in sqnr],
            "recipe_sqnr_db": None if recipe_sqnr is None else [_json_float(v) for v in recipe_sqnr],
            "min_sqnr_db": floor,
            "int8_kernels": int8_kernels,
            "float_kernels": float_kernels,
        },
        versions=library_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=tuple(sys.argv),
    )
    sidecar_file = onnx_sidecar_path(path)
    write_json_atomic(sidecar_file, sidecar.to_dict())
    return ExportRecord(
        path=path,
        sidecar_path=sidecar_file,
        precision=precision,
        opset=opset,
        input_name=INPUT_NAME,
        output_names=list(names),
        reference=reference_name,
        sqnr_db=sqnr,
        min_sqnr_db=floor,
        verified_images=int(sample.shape[0]),
        int8_kernels=int8_kernels,
        float_kernels=float_kernels,
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
        twin=twin_summary,
        notes=notes,
        recipe_sqnr_db=recipe_sqnr,
    )


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "ONNX_SIDECAR_FORMAT",
    "ExportRecord",
    "OnnxSidecar",
    "describe_preprocessing",
    "export_onnx",
    "kernel_counts",
    "library_versions",
    "onnx_sidecar_path",
    "ort_session",
    "read_onnx_sidecar",
]
