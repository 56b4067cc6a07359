"""The MEFN model (``docs/math.md``, section 2): encoders, the local cross-attention branch with entropy-aware
weights, the global attention-pooling branch and their learned fusion.

    model = MEFN(text_encoder="path/to/bert", region_dim=2048, embed_dim=1024)
    img = model.encode_images(features, region_lengths)       # precomputed (B, N, F) regions
    txt = model.encode_texts(input_ids, attention_mask)        # tokenised captions
    scores = model.similarity(img, txt)                        # (B_img, B_txt)

Ablations of the paper's Table 3 are constructor switches: ``mfe=False``, ``use_local=False``
(a VSE++-style global model), ``use_global=False`` (with ``mfe=False``: SCAN).
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..api import check_lengths, xattn_similarity
from ..options import make_options
from .embeddings import ImageEmbeddings, TextEmbeddings
from .encoders import PrecomputedRegionEncoder, TimmImageEncoder, build_text_encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"


def _lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _json_normalised(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


class MEFN(nn.Module):
    """Multi-scale Entropy-aware Fusion Network (``docs/math.md``, section 2).

    Args:
        embed_dim: the joint space's dimension d.
        image_encoder: ``"precomp"`` (region features of dimension ``region_dim``) or ``"timm"``.
        region_dim: F, the precomputed features' dimension.
        timm_model, timm_pretrained, timm_kwargs: the ``timm`` backbone (pretrained off by default).
        text_encoder: a ``transformers`` model name or local path, a config (``PretrainedConfig``
            or a dict with ``model_type``) or an ``nn.Module`` whose output has ``last_hidden_state``.
        text_pretrained: load the named model's weights (else only its configuration).
        mfe, direction, lambda_t2i, lambda_i2t, attn_norm, tau, agg, lambda_lse: the similarity's options (docs/math.md, section 1).
        use_local, use_global: the two branches (at least one).
        backend: backend of the local similarity (see :func:`mefn_fast.xattn_similarity`).
    """

    def __init__(self, *, embed_dim: int = 1024, image_encoder: str = "precomp", region_dim: int = 2048,
                 timm_model: Optional[str] = None, timm_pretrained: bool = False, timm_kwargs: Optional[dict] = None,
                 text_encoder: Union[str, Any] = "bert-base-uncased", text_pretrained: bool = True,
                 mfe: bool = True, use_local: bool = True, use_global: bool = True, direction: str = "t2i",
                 lambda_t2i: float = 9.0, lambda_i2t: float = 4.0, attn_norm: str = "clipped_l2norm",
                 tau: float = 0.25, agg: str = "mean", lambda_lse: float = 6.0, backend: str = "auto"):
        super().__init__()
        if not (use_local or use_global):
            raise ValueError("use_local and use_global cannot both be False")
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int; got {embed_dim!r}")
        self.opts = make_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse)
        self.use_local, self.use_global, self.backend = bool(use_local), bool(use_global), backend
        self.embed_dim = embed_dim

        if image_encoder == "precomp":
            self.image_encoder = PrecomputedRegionEncoder(region_dim, embed_dim)
        elif image_encoder == "timm":
            if not timm_model:
                raise ValueError("image_encoder='timm' needs timm_model (a timm model name)")
            self.image_encoder = TimmImageEncoder(timm_model, embed_dim, timm_pretrained, **(timm_kwargs or {}))
        else:
            raise ValueError(f"image_encoder={image_encoder!r} is not one of ('precomp', 'timm')")

        self.text_encoder = build_text_encoder(text_encoder, text_pretrained)
        hidden = getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError("the text encoder must have config.hidden_size")
        self.word_proj = nn.Linear(hidden, embed_dim)
        self.cls_proj = nn.Linear(hidden, embed_dim)
        self.global_query = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.fusion_logit = nn.Parameter(torch.zeros(()))  # gamma, sigma(0) = 1/2

        text_cfg = text_encoder if isinstance(text_encoder, (str, os.PathLike)) else None
        # JSON-normalised (e.g. int dict keys become strings) so a loaded config compares equal.
        self.config = _json_normalised(dict(
            embed_dim=embed_dim, image_encoder=image_encoder, region_dim=region_dim, timm_model=timm_model,
            timm_kwargs=copy.deepcopy(timm_kwargs), text_encoder=os.fspath(text_cfg) if text_cfg else None,
            text_config=self.text_encoder.config.to_dict() if hasattr(self.text_encoder.config, "to_dict") else None,
            use_local=self.use_local, use_global=self.use_global, backend=backend, **self.opts.to_dict()))

    # ------------------------------------------------------------------ encoders
    def encode_images(self, images: torch.Tensor, region_lengths: Optional[torch.Tensor] = None) -> ImageEmbeddings:
        """Regions (B, N, d), their lengths and the attention-pooled global vector."""
        regions = self.image_encoder(images)
        b, n, _ = regions.shape
        region_lengths = check_lengths("region_lengths", region_lengths, b, n, regions.device)
        logits = regions @ self.global_query / math.sqrt(self.embed_dim)  # (B, N)
        logits = logits.masked_fill(~_lengths_mask(region_lengths, n), -math.inf)
        beta = torch.softmax(logits, dim=1)
        global_ = (beta.unsqueeze(-1) * regions).sum(1)
        return ImageEmbeddings(regions, region_lengths, global_)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     special_tokens_mask: Optional[torch.Tensor] = None) -> TextEmbeddings:
        """Words (the non-special tokens, left-aligned), their lengths and the [CLS] vector.

        Without ``special_tokens_mask`` the BERT layout is assumed: the first and the last attended
        token ([CLS] and [SEP]) are special. A caption with no word keeps its [CLS] state as its
        only word, so that every caption has length >= 1.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        b, length, _ = hidden.shape
        valid = attention_mask.bool()
        if special_tokens_mask is None:
            special = torch.zeros_like(valid)
            special[:, 0] = True
            last = valid.long().sum(1) - 1
            special[torch.arange(b, device=valid.device), last.clamp_min(0)] = True
        else:
            special = special_tokens_mask.bool()
        is_word = valid & ~special
        empty = ~is_word.any(1)
        is_word[empty, 0] = True  # fallback: [CLS] as the only word
        lengths = is_word.long().sum(1)
        order = torch.argsort((~is_word).to(torch.int8), dim=1, stable=True)  # words first, in order
        m = int(lengths.max()) if b else 1
        idx = order[:, :m]
        words = torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return TextEmbeddings(self.word_proj(words), lengths, self.cls_proj(hidden[:, 0]))

    # ------------------------------------------------------------------ scores
    def fusion_weight(self) -> torch.Tensor:
        """sigma(gamma), the weight of the local branch in the fused score."""
        return torch.sigmoid(self.fusion_logit)

    def local_similarity(self, img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        o = self.opts
        return xattn_similarity(img.regions, img.lengths, txt.words, txt.lengths, direction=o.direction,
                                lambda_t2i=o.lambda_t2i, lambda_i2t=o.lambda_i2t, attn_norm=o.attn_norm,
                                mfe=o.mfe, tau=o.tau, agg=o.agg, lambda_lse=o.lambda_lse, backend=self.backend)

    @staticmethod
    def global_similarity(img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        return F.normalize(img.global_, dim=-1) @ F.normalize(txt.cls, dim=-1).t()

    def similarity(self, img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        """(B_img, B_txt) fused scores: sigma(gamma) s_local + (1 - sigma(gamma)) s_global."""
        if not self.use_global:
            return self.local_similarity(img, txt)
        s_global = self.global_similarity(img, txt)
        if not self.use_local:
            return s_global
        g = self.fusion_weight()
        return g * self.local_similarity(img, txt).to(s_global.dtype) + (1 - g) * s_global

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                region_lengths: Optional[torch.Tensor] = None,
                special_tokens_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Score every image in the batch against every caption: (B_img, B_txt)."""
        return self.similarity(self.encode_images(images, region_lengths),
                               self.encode_texts(input_ids, attention_mask, special_tokens_mask))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` (everything needed to rebuild) and ``weights.pt`` to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config, f, indent=1)
        torch.save(self.state_dict(), os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def config_kwargs(cls, config: dict) -> dict:
        """Constructor arguments that rebuild a model from a saved config, without downloading weights."""
        kw = dict(config)
        text_config = kw.pop("text_config")
        name = kw.pop("text_encoder")
        kw["text_encoder"] = text_config if text_config is not None else name
        kw["text_pretrained"] = False
        kw["timm_pretrained"] = False
        return kw

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], map_location="cpu") -> "MEFN":
        """Rebuild a model saved by :meth:`save` (configuration plus weights)."""
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = json.load(f)
        model = cls(**cls.config_kwargs(config))
        state = torch.load(os.path.join(directory, WEIGHTS_NAME), map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        model.config = config
        return model
