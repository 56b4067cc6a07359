"""Where and how the applications run: the device, mixed precision and progress bars."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def progress_bar(progress: bool, **kw):
    """A tqdm progress bar; a silent one when ``progress`` is False."""
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA only (``amp``: "auto" = bf16 where supported else fp16, "bf16",
    "fp16", "off"); a no-op context on the CPU."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` on ``device`` (None: full precision; always None on the CPU)."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp={amp!r} is not one of auto, off, bf16, fp16")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU when one is visible, else the CPU; otherwise ``torch.device(device)``.

    A malformed name, or a CUDA device that is not there, is a ``ValueError`` naming ``device``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r}: {torch.cuda.device_count()} CUDA devices are visible")
    return dev
