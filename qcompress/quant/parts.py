"""Partial int8 for detectors whose forward eager mode cannot quantize whole (torchvision's).

Eager mode quantizes *modules*; a torchvision detector also runs code between them: its transform,
anchor generation, box decoding, NMS, RoI pooling, and inside its backbones ``out += identity``,
``scale * x`` and FPN's ``lateral + upsampled``. We

1. rewrite those in-place/functional ops of the backbone blocks as ``FloatFunctional`` ops (the
   module's class is swapped for a subclass whose ``forward`` differs only there; parameters and
   state_dict keys are untouched), and declare their Conv+BN(+ReLU) fusion groups;
2. wrap each int8 part named by the architecture (its registry entry's ``CompressionSpec.int8_parts``: the backbone with FPN or
   extras, and the head convs that are applied per feature map) in an :class:`Int8Part`:
   ``QuantStub`` -> part -> ``DeQuantStub`` on every output;
3. give only those parts a qconfig; everything else stays float and is listed in the report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models import mobilenetv3, resnet
from torchvision.models.detection import ssd as tv_ssd
from torchvision.ops import feature_pyramid_network as tv_fpn
from torchvision.ops import misc as tv_misc

from qcompress.errors import QCompressError
from qcompress.quant.ptq import wrap_matching

# Why the rest stays float, for the report.
ALWAYS_FLOAT = "transform (resize/normalise), anchors, box decoding and NMS"


class Int8Part(nn.Module):
    """Quantize the input, run ``module`` in int8, dequantize every output (tensor, list or dict)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.module = module
        self.dequant = DeQuantStub()

    def _float(self, value):
        if isinstance(value, torch.Tensor):
            return self.dequant(value)  # a no-op on float tensors (e.g. SSD300's L2-normalised map)
        if isinstance(value, dict):
            return OrderedDict((k, self._float(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self._float(v) for v in value)
        return value

    def forward(self, x: torch.Tensor):
        return self._float(self.module(self.quant(x)))


# ---------------------------------------------------------------------------- FloatFunctional rewrites
class _MobileNetV3Block(mobilenetv3.InvertedResidual):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        return self.skip_add.add(result, input) if self.use_res_connect else result


class _SqueezeExcitation(tv_misc.SqueezeExcitation):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.skip_mul.mul(self._scale(input), input)


class _Bottleneck(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.skip_add_relu.add_relu(out, identity)


class _BasicBlock(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.skip_add_relu.add_relu(out, identity)


class _FPN(tv_fpn.FeaturePyramidNetwork):
    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names, features = list(x.keys()), list(x.values())
        last_inner = self.get_result_from_inner_blocks(features[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(features[idx], idx)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = self.skip_adds[idx].add(lateral, top_down)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))


class _VGGFeatures(tv_ssd.SSDFeatureExtractorVGG):
    """The L2-normalised conv4_3 output leaves int8 here (``F.normalize`` is float only); the extras
    keep running on the int8 tensor."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(x)
        output = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(self.dequant_l2(x))]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(output))


def _swap(module: nn.Module, cls: type, fusion: list[list[str]] | None = None, **extra: nn.Module) -> None:
    module.__class__ = cls
    for name, child in extra.items():
        setattr(module, name, child)
    if fusion:
        module.qcompress_fusion_groups = fusion


def make_functional_ops_quantizable(model: nn.Module) -> int:
    """Rewrite the functional ops of known backbone blocks as FloatFunctional; returns how many blocks."""
    count = 0
    for module in list(model.modules()):
        kind = type(module)
        if kind is mobilenetv3.InvertedResidual:
            _swap(module, _MobileNetV3Block, skip_add=FloatFunctional())
        elif kind is tv_misc.SqueezeExcitation:
            fusion = [["fc1", "activation"]] if isinstance(module.activation, nn.ReLU) else None
            _swap(module, _SqueezeExcitation, fusion, skip_mul=FloatFunctional())
        elif kind is resnet.Bottleneck:
            _swap(module, _Bottleneck, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3"]],
                  relu1=nn.ReLU(), relu2=nn.ReLU(), skip_add_relu=FloatFunctional())
        elif kind is resnet.BasicBlock:
            _swap(module, _BasicBlock, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]],
                  relu1=nn.ReLU(), skip_add_relu=FloatFunctional())
        elif kind is tv_fpn.FeaturePyramidNetwork:
            adds = nn.ModuleList(FloatFunctional() for _ in range(len(module.inner_blocks)))
            _swap(module, _FPN, skip_adds=adds)
        elif kind is tv_ssd.SSDFeatureExtractorVGG:
            _swap(module, _VGGFeatures, dequant_l2=DeQuantStub())
        else:
            continue
        count += 1
    return count


def wrap_int8_parts(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Wrap every module matching ``patterns`` (topmost match) in an :class:`Int8Part`; returns their names."""
    wrapped, missing = wrap_matching(model, patterns, Int8Part)
    if missing:
        raise QCompressError(f"the model has no module named {', '.join(missing)}", "is --arch right for this checkpoint?")
    return wrapped


def prepare_int8_parts(model: nn.Module, arch: str) -> list[str] | None:
    """In place: FloatFunctional rewrites + Int8Part wrappers for ``arch``; returns the int8 part names,
    or None for architectures that quantize whole (their network carries its own stubs)."""
    from qcompress.models.registry import compression_spec

    patterns = compression_spec(arch).int8_parts
    if patterns is None:
        return None
    make_functional_ops_quantizable(model)
    return wrap_int8_parts(model, patterns)


def float_parts(model: nn.Module, int8_parts: Sequence[str] | None) -> list[str] | None:
    """What stays float, for the recipe: modules with weights outside every int8 part (shortest names)
    and :data:`ALWAYS_FLOAT`; None when the whole network is quantized (``int8_parts`` None)."""
    if int8_parts is None:
        return None
    inside = tuple(p + "." for p in int8_parts)
    names = []
    for name, module in model.named_modules():
        if not name or name.startswith(inside) or name in int8_parts or any(p.startswith(name + ".") for p in int8_parts):
            continue
        if any(True for _ in module.parameters(recurse=True)) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return [*names, ALWAYS_FLOAT]


def parts_summary(model: nn.Module, recipe: dict) -> list[list]:
    """Rows ``[part, precision, layers with weights]`` for a converted model with int8 parts."""
    from qcompress.quant.ptq import is_int8

    rows: list[list] = []
    for name in recipe.get("int8_parts") or ():
        part = model.get_submodule(name)
        int8 = sum(is_int8(m) for m in part.modules())
        still_float = sum(type(m) in (nn.Conv2d, nn.Linear) for m in part.modules())
        rows.append([name, "int8" if not still_float else f"int8 ({still_float} kept float)", int8 + still_float])
    for name in recipe.get("float_parts") or ():
        try:
            part = model.get_submodule(name)
        except AttributeError:  # a description such as "transform, anchors, NMS"
            rows.append([name, "float", 0])
            continue
        rows.append([name, "float", sum(type(m) in (nn.Conv2d, nn.Linear, nn.GroupNorm) for m in part.modules())])
    return rows
