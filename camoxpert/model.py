"""CamoXpert: a timm feature backbone, per-scale attention and Mixture-of-Experts, an FPN decoder with a
high-resolution path, and deep-supervision heads.

``forward`` returns a dict whose tensors all have a batch dimension except ``aux_loss``, which is 0-dim so that
DataParallel averages it across replicas instead of gathering a vector. Nothing is cached or mutated in
``forward`` apart from BatchNorm buffers, and gradient checkpointing is a flag read inside ``forward``, so
replicas made by DataParallel each run their own weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from camoxpert.backbone import build_backbone, feature_stage_groups
from camoxpert.decoder import FPNDecoder, HighResolutionPath, upsample_to
from camoxpert.moe import MoEBlock, default_top_k

__all__ = ["MODEL_ARGS", "CamoXpert", "build_model"]

MODEL_ARGS = ("backbone", "num_experts", "top_k", "deep_supervision", "img_size")
"""The configuration keys that decide the architecture (and the input size), as saved in a checkpoint's args."""


class CamoXpert(nn.Module):
    """Camouflaged object detector.

    Args:
        backbone: any timm model name that supports ``features_only=True``.
        num_experts: experts per MoE block (one block per backbone scale); 7 gives one of each expert type.
        top_k: experts per image; default ``max(2, num_experts // 2)`` clamped to ``num_experts`` (3 for 7).
        deep_supervision: also return one side prediction per backbone scale.
        pretrained: load ImageNet weights for the backbone when available (cache, or download when online);
            otherwise fall back to random initialisation with a warning. ``pretrained_loaded`` tells which.
        pretrained_path: explicit timm weight file for the backbone (implies ``pretrained``).
        gradient_checkpointing: recompute decoder blocks (and the backbone's stages, through timm) in backward.
        decoder_channels: width of the FPN levels and the MoE blocks.
    """

    def __init__(
        self,
        backbone: str = "edgenext_base",
        num_experts: int = 7,
        top_k: int | None = None,
        deep_supervision: bool = False,
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        gradient_checkpointing: bool = False,
        decoder_channels: int = 64,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.num_experts = num_experts
        self.top_k = default_top_k(num_experts) if top_k is None else top_k
        self.deep_supervision = deep_supervision
        self.backbone, self.pretrained_loaded = build_backbone(
            backbone, pretrained=pretrained, pretrained_path=pretrained_path
        )
        self.feature_channels = [int(c) for c in self.backbone.feature_info.channels()]
        self.feature_reductions = [int(r) for r in self.backbone.feature_info.reduction()]
        self.decoder = FPNDecoder(self.feature_channels, decoder_channels, num_experts, self.top_k)
        self.high_res = HighResolutionPath(decoder_channels)
        self._gradient_checkpointing = False
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self._gradient_checkpointing = bool(enable)
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(bool(enable))

    def leaves_experts_idle(self, device: torch.device) -> bool:
        """Whether a training step on ``device`` can leave an expert's parameters out of the graph (the gather
        dispatch runs only the experts some image chose), so that DDP must look for unused parameters every step."""
        return any(block.dispatch_on(device) == "gather" for block in self.modules() if isinstance(block, MoEBlock))

    def backbone_stages(self) -> list[nn.Module]:
        """One module per backbone feature level, deepest first: unfreeze ``stages[:k]`` to train the ``k``
        deepest levels. The stem belongs to the shallowest level."""
        return list(reversed(feature_stage_groups(self.backbone)))

    def _run(self, function, *args):
        """Calls ``function`` directly or through non-reentrant checkpointing, decided per call."""
        if self._gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def forward(self, images: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Args:
            images: ``B x 3 x H x W``, ImageNet-normalised.

        Returns:
            ``{"mask": B x 1 x H x W logits, "aux_loss": 0-dim MoE balancing loss (sum over blocks),
            "side": list of B x 1 x H x W logits, finest scale first (empty without deep supervision)}``.
        """
        features = self.backbone(images)
        if isinstance(features, dict):
            features = list(features.values())
        aux_loss = images.new_zeros((), dtype=torch.float32)
        decoded: list[Tensor] = [None] * len(features)  # type: ignore[list-item]
        coarser = None
        for index in reversed(range(len(features))):
            coarser, level_aux = self._run(self.decoder.level_forward, index, features[index], coarser)
            decoded[index] = coarser
            aux_loss = aux_loss + level_aux.float()
        half, quarter = self._run(self.high_res.stem, images)
        mask = self._run(self.high_res.fuse, decoded[0], half, quarter)
        mask = upsample_to(mask, images)
        side: list[Tensor] = []
        if self.deep_supervision:
            side = [upsample_to(level.side_head(x), images) for level, x in zip(self.decoder.levels, decoded)]
        return {"mask": mask, "aux_loss": aux_loss, "side": side}


def build_model(config: dict[str, Any], *, pretrained: bool = False, pretrained_path: str | None = None) -> CamoXpert:
    """A CamoXpert from the model keys of a run's configuration (the CLI flags or a checkpoint's ``args``)."""
    return CamoXpert(
        backbone=config["backbone"], num_experts=config["num_experts"], top_k=config.get("top_k"),
        deep_supervision=bool(config.get("deep_supervision", False)), pretrained=pretrained,
        pretrained_path=pretrained_path, gradient_checkpointing=bool(config.get("gradient_checkpointing", False)),
    )
