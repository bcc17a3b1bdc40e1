"""The composite model: one shared trunk with the DeepMask, SharpMask and MultiPathNet stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from segmodels.backbones import ImageNetTail, build_imagenet_tail, build_trunk
from segmodels.click_head import ClickHead
from segmodels.deepmask import DeepMask
from segmodels.multipathnet import LabelHead, MultiPathNet
from segmodels.quality_head import QualityHead
from segmodels.sharpmask import SharpMask


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; stored in checkpoint metadata so a checkpoint rebuilds itself."""

    backbone: str = "mobilenet_v2"
    reduce_channels: int = 32
    embed_dim: int = 512
    sharpmask_k: tuple[int, ...] = (32, 16, 8, 4)
    # MultiPathNet's label set: names, and the dataset's category ids they came from (same order).
    classes: list[str] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)
    # MultiPathNet's ImageNet label head (multipathnet.LabelHead); checkpoints from before it lack the key.
    label_head: bool = True
    # The click head for corrective clicks (click_head.ClickHead); checkpoints from before it lack the key.
    click_head: bool = False
    # The quality head ranking a first click's windows (quality_head.QualityHead); older checkpoints lack it.
    quality_head: bool = False
    # A second click head for a first click's steps only (trained on window-like previous masks); without
    # one the click head takes them. Older checkpoints lack the key.
    first_click_head: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["sharpmask_k"] = tuple(data.get("sharpmask_k", cls.sharpmask_k))
        # Checkpoints from before the label head: their MultiPathNet has none; without one, one is added.
        data.setdefault("label_head", not data.get("classes"))
        return cls(**data)


class SegmentationModel(nn.Module):
    """``trunk`` (taps s2..s16), ``deepmask`` (embedding, mask, objectness), ``sharpmask`` (refinement),
    ``multipathnet`` (labels) when the config has classes, and ``click_head``, ``first_click_head`` and
    ``quality_head`` when the config asks for them."""

    def __init__(self, config: ModelConfig, pretrained_trunk: bool = True, trunk_weights: str | None = None):
        super().__init__()
        self.config = config
        self.trunk = build_trunk(config.backbone, pretrained=pretrained_trunk, weights_path=trunk_weights)
        self.deepmask = DeepMask(self.trunk.tap_channels["s16"], config.reduce_channels, config.embed_dim)
        self.sharpmask = SharpMask(self.trunk.tap_channels, config.embed_dim, config.sharpmask_k)
        self.click_head = ClickHead(self.trunk.tap_channels) if config.click_head else None
        self.first_click_head = ClickHead(self.trunk.tap_channels) if config.first_click_head else None
        self.quality_head = QualityHead(config.embed_dim) if config.quality_head else None
        self.multipathnet: MultiPathNet | None = None
        if config.classes:
            tail = (
                build_imagenet_tail(config.backbone, pretrained_trunk, trunk_weights)
                if config.label_head
                else None
            )
            self.multipathnet = self._new_multipathnet(tail)

    def _new_multipathnet(self, tail: ImageNetTail | None) -> MultiPathNet:
        names = self.config.classes
        head = LabelHead(tail, names) if tail is not None else None
        return MultiPathNet(self.trunk.tap_channels, len(names), label_head=head)

    def set_classes(self, names: list[str], ids: list[int]) -> None:
        """Replace the label set with a new, untrained MultiPathNet for ``names`` (dataset ids ``ids``). Its
        label head reuses the current one's frozen ImageNet tail, or loads the ImageNet weights."""
        if len(names) != len(ids):
            raise ValueError(f"{len(names)} class names but {len(ids)} ids")
        old = self.multipathnet
        self.config.classes, self.config.class_ids = list(names), list(ids)
        tail = None
        if self.config.label_head:
            old_head = old.label_head if old is not None else None
            tail = old_head.tail if old_head is not None else build_imagenet_tail(self.config.backbone)
        device = next(self.trunk.parameters()).device
        self.multipathnet = self._new_multipathnet(tail).to(device)

    def require_multipathnet(self) -> MultiPathNet:
        """``multipathnet``; RuntimeError for a model without a label set (train one: set_classes)."""
        if self.multipathnet is None:
            raise RuntimeError("this model has no MultiPathNet stage (no label set)")
        return self.multipathnet
