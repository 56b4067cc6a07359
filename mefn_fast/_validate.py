"""Input checking shared by every backend (bad input raises a ValueError / TypeError naming the argument; it never crashes)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Lengths = Optional[Union[torch.Tensor, Sequence[int]]]


def check_features(name: str, x) -> torch.Tensor:
    """A (B, L, d) floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, length, dim); got {x.dim()} dims {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.shape[2] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    return x


def check_lengths(name: str, lengths: Lengths, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Lengths as an int64 tensor on ``device``, every value in [1, max_len].

    ``None`` means every item is full length. A Python sequence of ints is accepted. A tensor must
    be 1-D with one entry per batch item, of an integer dtype, on ``device`` or on the CPU.
    """
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        try:
            seq = list(lengths)
        except TypeError:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints; got {type(lengths).__name__}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in seq):
            raise TypeError(f"{name} must hold ints")
        lengths = torch.tensor(seq, dtype=torch.int64)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},); got {tuple(lengths.shape)}")
    if lengths.device != device and lengths.device.type != "cpu":
        raise ValueError(f"{name} is on device {lengths.device} but the features are on {device}")
    if batch and torch.compiler.is_compiling():
        # Reading the range would be a graph break: CPU lengths are checked inside the graph
        # (RuntimeError); on a GPU the ops check them when they run (a device assert would be fatal).
        if lengths.device.type == "cpu":
            torch._assert_async(((lengths >= 1) & (lengths <= max_len)).all(), f"{name} must lie in [1, {max_len}]")
    elif batch:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > max_len:
            raise ValueError(f"{name} must lie in [1, {max_len}]; got values in [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.int64)


def check_inputs(regions, region_lengths: Lengths, words, word_lengths: Lengths):
    """Validate the four inputs of ``xattn_similarity``; return them with lengths as int64 tensors."""
    check_features("regions", regions)
    check_features("words", words)
    if regions.shape[2] != words.shape[2]:
        raise ValueError(f"regions and words must share the feature dimension; got {regions.shape[2]} and {words.shape[2]}")
    if regions.device != words.device:
        raise ValueError(f"regions and words must be on the same device; regions is on {regions.device}, words on {words.device}")
    if regions.dtype != words.dtype:
        raise TypeError(f"regions ({regions.dtype}) and words ({words.dtype}) must have the same dtype")
    region_lengths = check_lengths("region_lengths", region_lengths, regions.shape[0], regions.shape[1], regions.device)
    word_lengths = check_lengths("word_lengths", word_lengths, words.shape[0], words.shape[1], words.device)
    return regions, region_lengths, words, word_lengths
