"""Top-k retrieval over a score matrix too large to hold: stream it in blocks, keep the best.

    result = stream_topk(score_block, n_images, n_captions, k=10)
    result.captions_of_image.indices   # (n_images, k) best captions of each image, best first
    result.images_of_caption.indices   # (n_captions, k) best images of each caption

``score_block(i0, i1, t0, t1)`` returns the (i1 - i0, t1 - t0) block of scores; it is called once
per block, row-major, so memory is O(block + (n_images + n_captions) * k). The result equals
sorting each row and column of the full matrix (ties broken by the lower index), which the tests
check.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class TopK(NamedTuple):
    values: torch.Tensor  # (n, k) best scores, descending
    indices: torch.Tensor  # (n, k) their column (or row) indices


class StreamedTopK(NamedTuple):
    captions_of_image: TopK
    images_of_caption: TopK


def _merge(best: TopK, values: torch.Tensor, indices: torch.Tensor) -> TopK:
    """Keep the k best of the running best and a new block whose indices are all larger."""
    v = torch.cat([best.values, values], dim=1)
    i = torch.cat([best.indices, indices], dim=1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, : best.values.shape[1]]
    return TopK(torch.gather(v, 1, order), torch.gather(i, 1, order))  # stable: the lower index wins a tie


def stream_topk(score_block: Callable[[int, int, int, int], torch.Tensor], n_images: int, n_captions: int,
                k: int = 10, image_chunk: int = 1024, caption_chunk: int = 4096, progress: bool = True) -> StreamedTopK:
    """The top-k captions of every image and top-k images of every caption, streaming blocks.

    Args:
        score_block: ``(i0, i1, t0, t1) -> (i1-i0, t1-t0)`` finite scores, e.g. a model's
            similarity of images i0:i1 against captions t0:t1.
        k: how many to keep (clipped to the number of captions / images).
        image_chunk, caption_chunk: the block size.
        progress: show a progress bar (tqdm) over the blocks.
    """
    for name, v in (("n_images", n_images), ("n_captions", n_captions), ("k", k),
                    ("image_chunk", image_chunk), ("caption_chunk", caption_chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    # Placeholders score -inf, below every finite score, so they are pushed out as blocks arrive.
    k_cap, k_img = min(k, n_captions), min(k, n_images)
    cap = TopK(torch.full((n_images, k_cap), -torch.inf, dtype=torch.float64),
               torch.full((n_images, k_cap), -1, dtype=torch.int64))
    img = TopK(torch.full((n_captions, k_img), -torch.inf, dtype=torch.float64),
               torch.full((n_captions, k_img), -1, dtype=torch.int64))
    # Row-major over blocks: for a fixed image block the caption blocks arrive in increasing
    # order, and for a fixed caption block the image blocks do too, as _merge requires.
    blocks = [(i0, t0) for i0 in range(0, n_images, image_chunk) for t0 in range(0, n_captions, caption_chunk)]
    bar = _progress_bar(len(blocks)) if progress else None
    for i0, t0 in blocks:
        i1, t1 = min(i0 + image_chunk, n_images), min(t0 + caption_chunk, n_captions)
        block = score_block(i0, i1, t0, t1)
        if not isinstance(block, torch.Tensor) or tuple(block.shape) != (i1 - i0, t1 - t0):
            raise ValueError(f"score_block({i0}, {i1}, {t0}, {t1}) must return a ({i1 - i0}, {t1 - t0}) tensor")
        block = block.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(block).all()):
            raise ValueError(f"score_block({i0}, {i1}, {t0}, {t1}) returned NaN or infinite scores")
        part = _merge(TopK(cap.values[i0:i1], cap.indices[i0:i1]), block, torch.arange(t0, t1).expand(i1 - i0, -1))
        cap.values[i0:i1], cap.indices[i0:i1] = part
        part = _merge(TopK(img.values[t0:t1], img.indices[t0:t1]), block.t(), torch.arange(i0, i1).expand(t1 - t0, -1))
        img.values[t0:t1], img.indices[t0:t1] = part
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return StreamedTopK(cap, img)


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="scoring blocks", unit="block")
