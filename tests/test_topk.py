"""Streaming top-k equals sorting the full score matrix."""
from __future__ import annotations

import pytest
import torch

from mefn_fast.retrieval.topk import stream_topk


def _full_topk(s: torch.Tensor, k: int):
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(s, 1, order), order


@pytest.mark.parametrize("image_chunk,caption_chunk", [(1, 1), (3, 7), (4, 50), (100, 100)])
@pytest.mark.parametrize("k", [1, 5, 10, 60])
def test_streaming_equals_full_sort(image_chunk, caption_chunk, k):
    g = torch.Generator().manual_seed(k)
    s = torch.randn(11, 45, generator=g, dtype=torch.float64)
    s[2, 5:9] = 0.25  # ties: the lower index must win, as in a stable sort
    s[:, 30] = s[:, 31]
    calls = []

    def block(i0, i1, t0, t1):
        calls.append((i0, t0))
        return s[i0:i1, t0:t1]

    out = stream_topk(block, 11, 45, k=k, image_chunk=image_chunk, caption_chunk=caption_chunk, progress=False)
    v, i = _full_topk(s, min(k, 45))
    assert torch.equal(out.captions_of_image.values, v) and torch.equal(out.captions_of_image.indices, i)
    v, i = _full_topk(s.t(), min(k, 11))
    assert torch.equal(out.images_of_caption.values, v) and torch.equal(out.images_of_caption.indices, i)
    assert len(calls) == len(set(calls)) == -(-11 // image_chunk) * -(-45 // caption_chunk)  # each block once


def test_bad_blocks_and_arguments():
    with pytest.raises(ValueError, match="k"):
        stream_topk(lambda *a: None, 2, 2, k=0)
    with pytest.raises(ValueError, match="shape|tensor"):
        stream_topk(lambda i0, i1, t0, t1: torch.zeros(1, 1), 2, 3, k=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        stream_topk(lambda i0, i1, t0, t1: torch.full((i1 - i0, t1 - t0), float("nan")), 2, 3, k=1, progress=False)
