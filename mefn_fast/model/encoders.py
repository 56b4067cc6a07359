"""The encoders of :class:`~mefn_fast.MEFN`: precomputed region features or a ``timm`` backbone for
the images, a ``transformers`` encoder for the captions."""
from __future__ import annotations

import os

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


def build_text_encoder(spec, pretrained: bool) -> nn.Module:
    """A transformers encoder from a name/path, a config (object or dict) or a module."""
    if isinstance(spec, nn.Module):
        return spec
    import transformers

    if isinstance(spec, transformers.PretrainedConfig):
        return transformers.AutoModel.from_config(spec, **_no_pooler(spec))
    if isinstance(spec, dict):
        cfg = dict(spec)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("a text_encoder config dict needs a 'model_type' (e.g. 'bert')")
        return build_text_encoder(transformers.AutoConfig.for_model(model_type, **cfg), pretrained)
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        config = transformers.AutoConfig.from_pretrained(spec)
        if pretrained:
            return transformers.AutoModel.from_pretrained(spec, **_no_pooler(config))
        return build_text_encoder(config, pretrained)
    raise TypeError(f"text_encoder must be a name, path, config, config dict or nn.Module; got {type(spec).__name__}")


def _no_pooler(config) -> dict:
    """Drop the unused pooling head where the model class takes that switch (BERT family)."""
    return {"add_pooling_layer": False} if getattr(config, "model_type", "") in ("bert", "roberta") else {}
