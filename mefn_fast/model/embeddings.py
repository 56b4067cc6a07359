"""The embeddings that :class:`~mefn_fast.MEFN` passes between its encoders and its scores.

Both types are named tuples of a padded sequence (B, L, d), its valid lengths (B,) and one vector
per item (B, d). Padding rows beyond an item's length never change a score, so embeddings of
several batches join by padding to the widest (``cat``), and a gallery is scored block by block
(:meth:`mefn_fast.MEFN.score_matrix`) with scores that do not depend on the block sizes.

    img = ImageEmbeddings.cat([model.encode_images(x, n) for x, n in image_batches])
    txt = TextEmbeddings.cat([model.encode_texts(**tok) for tok in caption_batches])
    scores = model.score_matrix(img, txt, image_chunk=128, caption_chunk=640)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F

Rows = Union[slice, int, torch.Tensor]
Self = TypeVar("Self", bound="_Batched")


class _Batched:
    """What both embedding types do with their (sequence, lengths, vectors) fields."""

    __slots__ = ()

    @classmethod
    def cat(cls: type[Self], parts: Sequence[Self]) -> Self:
        """Join the embeddings of several batches, the sequences padded to the widest batch."""
        parts = list(parts)
        if not parts:
            raise ValueError(f"{cls.__name__}.cat needs at least one {cls.__name__}")
        for i, p in enumerate(parts):
            if not isinstance(p, cls):
                raise TypeError(f"{cls.__name__}.cat: part {i} is a {type(p).__name__}, not a {cls.__name__}")
        width = max(p[0].shape[1] for p in parts)
        seqs = [F.pad(p[0], (0, 0, 0, width - p[0].shape[1])) for p in parts]
        return cls(torch.cat(seqs), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    def rows(self: Self, index: Rows) -> Self:
        """The items ``index`` (a slice, an int or an index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return type(self)(*(x[index] for x in self))

    def trimmed(self: Self) -> Self:
        """The same items without the slots beyond the longest one (a host sync: it reads the lengths)."""
        seq, lengths, vec = self
        return type(self)(seq[:, :int(lengths.max()) if lengths.numel() else seq.shape[1]], lengths, vec)

    def to(self: Self, *args, **kwargs) -> Self:
        """The sequence and vectors moved like ``Tensor.to``; the lengths change device, never dtype."""
        seq, lengths, vec = self
        seq = seq.to(*args, **kwargs)
        return type(self)(seq, lengths.to(seq.device), vec.to(*args, **kwargs))


class _ImageFields(NamedTuple):
    regions: torch.Tensor  # (B, N, d) projected regions
    lengths: torch.Tensor  # (B,) valid regions
    global_: torch.Tensor  # (B, d) attention-pooled image vector


class _TextFields(NamedTuple):
    words: torch.Tensor  # (B, M, d) projected non-special tokens, left-aligned
    lengths: torch.Tensor  # (B,) valid words
    cls: torch.Tensor  # (B, d) projected [CLS] state


class ImageEmbeddings(_Batched, _ImageFields):
    """What :meth:`MEFN.encode_images` returns: ``regions`` (B, N, d), ``lengths`` (B,), ``global_`` (B, d)."""

    __slots__ = ()


class TextEmbeddings(_Batched, _TextFields):
    """What :meth:`MEFN.encode_texts` returns: ``words`` (B, M, d), ``lengths`` (B,), ``cls`` (B, d)."""

    __slots__ = ()
