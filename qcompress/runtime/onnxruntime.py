"""Run an exported ``.onnx`` as a qcompress detector: accuracy and latency measured on the deployed file.

:func:`load_onnx_detector` reads ``model.onnx`` + ``model.onnx.json`` (see
:mod:`qcompress.runtime.onnx_export`) and returns an :class:`OnnxDetector`: a
:class:`~qcompress.models.detector.Detector` whose ``model`` is an ``nn.Module`` running an ONNX Runtime
(or OpenVINO) session. Pre-processing and decoding + NMS are the torch detector's own, rebuilt from
the sidecar's architecture, classes and options, so ``predict_dataset``, the mAP code and the latency
code work on it unchanged.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.io_utils import sha256_file
from qcompress.models.detector import Detections, Detector, ModelSpec, PostprocessConfig
from qcompress.runtime.onnx_export import OnnxSidecar, onnx_sidecar_path, read_onnx_sidecar

RUNTIMES = ("onnxruntime", "openvino")


def openvino_available() -> bool:
    """True when the optional ``openvino`` package is installed (``pip install qcompress[openvino]``)."""
    return importlib.util.find_spec("openvino") is not None


def _as_output(arrays: Sequence[np.ndarray]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return tensors[0] if len(tensors) == 1 else tensors


def _images_array(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.detach().to(torch.float32).cpu().numpy())


class OrtNetwork(nn.Module):
    """An ONNX Runtime CPU session as a network: ``(N, 3, h, w)`` float tensor -> raw outputs as tensors.

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per physical core); execution is
    sequential with one inter-op thread. ``providers`` / ``provider_options`` go to
    ``onnxruntime.InferenceSession`` unchanged (default: the CPU execution provider only).
    The session is rebuilt from the file when the module is unpickled (e.g. in a data-loader worker).
    """

    def __init__(
        self,
        path: Path,
        input_name: str,
        output_names: Sequence[str],
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.input_name = input_name
        self.output_names = list(output_names)
        self.threads = threads
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.provider_options = [dict(o) for o in provider_options] if provider_options else None
        self.session = self._open()

    def _open(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(
                str(self.path), options, providers=self.providers, provider_options=self.provider_options
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QCompressError(
                f"ONNX Runtime cannot load {self.path}: {reason[:300]}",
                "the file is corrupt or not an ONNX model; export it again",
            ) from None

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return _as_output(self.session.run(self.output_names, {self.input_name: _images_array(images)}))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = self._open()

    def extra_repr(self) -> str:
        return f"{self.path.name}, threads={self.threads}, providers={self.providers}"


class OpenVinoNetwork(nn.Module):
    """The contract of :class:`OrtNetwork`, compiled by OpenVINO for its CPU device (optional dependency)."""

    def __init__(
        self, path: Path, input_name: str, output_names: Sequence[str], threads: int | None = None
    ) -> None:
        super().__init__()
        if not openvino_available():
            raise QCompressError("the OpenVINO runtime is not installed", "pip install 'qcompress[openvino]'")
        self.path = Path(path)
        self.input_name = input_name
        self.output_names = list(output_names)
        self.threads = threads
        self.compiled = self._open()

    def _open(self):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": int(self.threads)} if self.threads else {}
        try:
            return ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - openvino raises RuntimeError with long messages
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QCompressError(
                f"OpenVINO cannot load {self.path}: {reason[:300]}", "export the model again"
            ) from None

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        result = self.compiled({self.input_name: _images_array(images)})
        return _as_output([result[self.compiled.output(name)] for name in self.output_names])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("compiled", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.compiled = self._open()


def _postprocess_with(template: Detector):
    """The template detector's decoding + NMS as a ``postprocess_fn`` honouring the caller's config."""

    def postprocess(
        raw: Any, image_sizes: Sequence[tuple[int, int]], config: PostprocessConfig
    ) -> list[Detections]:
        template.postprocess_config = config
        return template.postprocess(raw, image_sizes)

    return postprocess


class OnnxDetector(Detector):
    """A :class:`Detector` whose network is an exported ONNX file run by ONNX Runtime or OpenVINO.

    ``preprocess`` and ``postprocess`` are those of the torch detector of the same architecture,
    classes and options (built from the sidecar); ``model(batch)`` runs the file. ``sidecar`` is the
    validated :class:`~qcompress.runtime.onnx_export.OnnxSidecar`, ``runtime`` the engine's name.
    """

    def __init__(self, network: nn.Module, sidecar: OnnxSidecar, template: Detector, runtime: str) -> None:
        spec = ModelSpec(
            sidecar.arch,
            tuple(sidecar.class_names),
            tuple(sidecar.input_size),
            tuple(sidecar.mean),
            sidecar.std,
            dict(sidecar.options),
        )
        super().__init__(network, spec, _postprocess_with(template))
        self.postprocess_config = PostprocessConfig(**sidecar.postprocess)
        self.sidecar = sidecar
        self.runtime = runtime

    @property
    def precision(self) -> str:
        """``"float32"`` or ``"int8-qdq"``."""
        return self.sidecar.precision


def load_onnx_detector(
    path: Path,
    *,
    threads: int | None = None,
    runtime: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    provider_options: Sequence[Mapping[str, Any]] | None = None,
    check_hash: bool = True,
) -> OnnxDetector:
    """Load ``path`` (a ``.onnx`` from :func:`~qcompress.runtime.onnx_export.export_onnx`) and its sidecar.

    ``runtime``: ``"onnxruntime"`` (CPU execution provider unless ``providers`` say otherwise) or
    ``"openvino"`` (needs the optional package). ``threads``: intra-op threads (None: the runtime's default).
    ``check_hash``: refuse a file whose sha256 differs from the one recorded at export (a corrupt or
    replaced file).
    """
    from qcompress.models.registry import build_detector

    path = Path(path)
    if runtime not in RUNTIMES:
        raise QCompressError(f"unknown runtime {runtime!r}", f"use one of: {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise QCompressError(f"ONNX model not found: {path}", "pass the path of an exported .onnx file")
    if not onnx_sidecar_path(path).is_file():
        raise QCompressError(
            f"no sidecar beside {path} ({onnx_sidecar_path(path).name})",
            "export with qcompress so that classes, input size and decoding are known",
        )
    sidecar = read_onnx_sidecar(path)
    sha = sha256_file(path)
    if check_hash and sha != sidecar.onnx_sha256:
        raise QCompressError(
            f"{path} does not match its sidecar (sha256 differs)",
            "the file is corrupt or was replaced; export it again",
        )
    if runtime == "openvino":
        network: nn.Module = OpenVinoNetwork(path, sidecar.input_name, sidecar.output_names, threads)
    else:
        network = OrtNetwork(
            path, sidecar.input_name, sidecar.output_names, threads, providers, provider_options
        )
    template = build_detector(sidecar.arch, sidecar.class_names, **sidecar.options)
    template.model = nn.Identity()  # only its decoding is used; drop the torch weights
    detector = OnnxDetector(network, sidecar, template, runtime)
    detector.source = {"path": str(path), "sha256": sha, "sidecar": sidecar.to_dict()}
    return detector


__all__ = [
    "RUNTIMES",
    "OnnxDetector",
    "OpenVinoNetwork",
    "OrtNetwork",
    "load_onnx_detector",
    "openvino_available",
]
