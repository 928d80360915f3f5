"""Detector builders and checkpoint loaders behind one registry."""

from qcompress.models.detector import Detections, Detector, ModelSpec
from qcompress.models.registry import build_detector, get_arch, list_archs

__all__ = ["Detections", "Detector", "ModelSpec", "build_detector", "get_arch", "list_archs"]
