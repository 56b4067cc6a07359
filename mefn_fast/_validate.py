"""Input checking shared by every backend (bad input raises a ValueError / TypeError naming the argument; it never crashes)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from .options import XAttnOptions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_UNSIGNED_WIDE = tuple(getattr(torch, t) for t in ("uint16", "uint32", "uint64") if hasattr(torch, t))
Lengths = Optional[Union[torch.Tensor, Sequence[int]]]


def check_features(name: str, x) -> torch.Tensor:
    """A (B, L, d) floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor; got layout {x.layout} (use .to_dense())")
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
    if batch and max_len < 1:
        raise ValueError(f"{name}: the features hold 0 rows per item (dim 1 is 0), but every item needs at least "
                         f"one{' (None means all rows)' if lengths is None else ''}")
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        lengths = _sequence_lengths(name, lengths, max_len)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype; got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},); got {tuple(lengths.shape)}")
    if lengths.device != device and lengths.device.type != "cpu":
        raise ValueError(f"{name} is on device {lengths.device} but the features are on {device}")
    if lengths.dtype in _UNSIGNED_WIDE:  # no min/max kernels; uint64 beyond int64 must not wrap
        lengths = lengths.to(torch.float64 if lengths.dtype == torch.uint64 else torch.int64)
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


def _sequence_lengths(name: str, lengths, max_len: int) -> torch.Tensor:
    """A sequence (list, tuple, NumPy array, iterable) of ints as an int64 tensor, each checked in
    Python first: a value beyond int64 is out of range, not an overflow inside torch."""
    try:
        seq = list(lengths)
    except TypeError:
        raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints; "
                        f"got {type(lengths).__name__}") from None
    for i, v in enumerate(seq):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints; got {type(v).__name__} at index {i}")
        if not 1 <= int(v) <= max_len:
            raise ValueError(f"{name} must lie in [1, {max_len}]; got {int(v)} at index {i}")
    return torch.tensor([int(v) for v in seq], dtype=torch.int64)


def check_hyperparameters(opts: XAttnOptions, dtype: torch.dtype) -> None:
    """Reject temperatures that the compute dtype (float64 for float64 inputs, else float32) cannot hold.

    The logits are scaled by lambda_t2i, lambda_i2t and lambda_lse, and divided by tau and
    lambda_lse: a factor beyond the dtype's range, or a divisor whose reciprocal is, would make
    the scores NaN, so it is an error naming the option (limits: ``docs/math.md``).
    """
    kind = "float64" if dtype == torch.float64 else "float32"
    big = torch.finfo(getattr(torch, kind)).max
    for option, divides in (("lambda_t2i", False), ("lambda_i2t", False), ("tau", True), ("lambda_lse", True)):
        value = getattr(opts, option)
        if value > big or divides and value < 1.0 / big:
            raise ValueError(f"{option}={value!r} is beyond the range of {kind}, in which {dtype} inputs are "
                             f"computed: it must lie in [{1.0 / big if divides else 0.0:.3g}, {big:.3g}]")


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
