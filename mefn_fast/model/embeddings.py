"""The embeddings that :class:`~mefn_fast.MEFN` passes between its encoders and its scores."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ImageEmbeddings(NamedTuple):
    regions: torch.Tensor  # (B, N, d) projected regions
    lengths: torch.Tensor  # (B,) valid regions
    global_: torch.Tensor  # (B, d) attention-pooled image vector


class TextEmbeddings(NamedTuple):
    words: torch.Tensor  # (B, M, d) projected non-special tokens, left-aligned
    lengths: torch.Tensor  # (B,) valid words
    cls: torch.Tensor  # (B, d) projected [CLS] state
