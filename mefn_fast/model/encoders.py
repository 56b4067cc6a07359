"""The image encoders of :class:`~mefn_fast.MEFN`: precomputed region features or a ``timm`` backbone.
The text encoders are built by :mod:`mefn_fast.model.text`."""
from __future__ import annotations

import torch
from torch import nn


class PrecomputedRegionEncoder(nn.Module):
    """Precomputed region features (B, N, F), e.g. bottom-up 36 x 2048, projected to d."""

    def __init__(self, region_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(region_dim, embed_dim)
        self.region_dim = region_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != self.region_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"images must be precomputed region features (B, N, {self.region_dim}); got {shape}")
        return self.proj(features)


class TimmImageEncoder(nn.Module):
    """Any ``timm`` backbone; its final feature map (CNN) or patch tokens (ViT) become the regions."""

    def __init__(self, model_name: str, embed_dim: int, pretrained: bool = False, **timm_kwargs):
        super().__init__()
        import timm

        self.backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, global_pool="", **timm_kwargs)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.proj = nn.Linear(self.backbone.num_features, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (B, C, H, W) tensor for a timm image encoder")
        feats = self.backbone.forward_features(images)
        if feats.dim() == 4:  # (B, C, h, w) feature map -> (B, h*w, C)
            feats = feats.flatten(2).transpose(1, 2)
        elif feats.dim() == 3:  # (B, T, C) tokens: drop [CLS] / register tokens
            feats = feats[:, self.num_prefix_tokens:]
        else:
            raise ValueError(f"unexpected timm feature shape {tuple(feats.shape)}")
        return self.proj(feats)
