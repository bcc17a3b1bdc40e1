"""The composite model: one shared trunk with the DeepMask and SharpMask stages, built from a config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from segmodels.backbones import build_trunk
from segmodels.deepmask import DeepMask
from segmodels.sharpmask import SharpMask


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; stored in checkpoint metadata so a checkpoint rebuilds itself."""

    backbone: str = "mobilenet_v2"
    reduce_channels: int = 32
    embed_dim: int = 512
    sharpmask_k: tuple[int, ...] = (32, 16, 8, 4)
    classes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["sharpmask_k"] = tuple(data.get("sharpmask_k", cls.sharpmask_k))
        return cls(**data)


class SegmentationModel(nn.Module):
    """``trunk`` (taps s2..s16), ``deepmask`` (embedding, mask, objectness), ``sharpmask`` (refinement)."""

    def __init__(self, config: ModelConfig, pretrained_trunk: bool = True, trunk_weights: str | None = None):
        super().__init__()
        self.config = config
        self.trunk = build_trunk(config.backbone, pretrained=pretrained_trunk, weights_path=trunk_weights)
        self.deepmask = DeepMask(self.trunk.tap_channels["s16"], config.reduce_channels, config.embed_dim)
        self.sharpmask = SharpMask(self.trunk.tap_channels, config.embed_dim, config.sharpmask_k)
