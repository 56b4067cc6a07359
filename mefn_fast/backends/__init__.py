"""The backends of ``xattn_similarity`` and the registry that picks one (the op layer).

- ``reference.py``: plain PyTorch, materialising, the ground truth every other backend is tested against;
- ``cpu.py``: the C++ CPU op (``csrc/xattn_similarity.cpp``);
- ``cuda.py``: the C++/CUDA op (``csrc/cuda/``), the same torch.library ops on the CUDA dispatch key;
- ``triton.py``: the Triton kernels of :mod:`mefn_fast.kernels` as custom ops;
- ``ext_ops.py``: the Python side of the C++ ops (fake kernels, autograd), shared by cpu and cuda;
- ``build.py``: the record of how the extension was built.

Modules here import only the op layer (``mefn_fast.options``, ``mefn_fast.kernels``, the compiled
``mefn_fast._C``), never the model or the applications.

The registry is modelled on xformers' dispatch: every backend declares the devices and dtypes it
takes and returns a list of reasons for inputs it cannot serve. ``"auto"`` picks the first backend
in preference order with no reasons; an explicit choice that cannot run raises a ``ValueError``
listing them. ``python -m mefn_fast.info`` prints the same information.

A backend's implementation is loaded lazily (nothing imports Triton, touches ``torch.cuda`` or
loads the C++ extension until a backend is first asked for), and a backend that fails to load
reports why instead of breaking ``import mefn_fast``.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..options import XAttnOptions

log = logging.getLogger("mefn_fast")

# An implementation: fn(regions, region_lengths, words, word_lengths, opts) -> scores.
Impl = Callable[..., torch.Tensor]


class BackendUnavailable(RuntimeError):
    """Raised by a backend's loader with the reason it cannot be used on this machine."""


_LOADED: dict = {}  # name -> (implementation, input_limits, reason)


@torch.compiler.assume_constant_result
def _load(name: str) -> Optional[str]:
    """Load backend ``name`` once into ``_LOADED``: None when it is available, else the reason it is not.

    Under ``torch.compile`` this runs at trace time and its result is a constant of the graph, so
    choosing a backend adds no graph break (the loaders import modules and query devices).
    """
    if name not in _LOADED:
        module = importlib.import_module(f"{__name__}.{name}")
        try:
            _LOADED[name] = (module.load(), getattr(module, "input_limits", None), None)
        except BackendUnavailable as e:
            _LOADED[name] = (None, None, str(e))
        except Exception as e:  # a broken build must not break the package
            _LOADED[name] = (None, None, f"failed to load: {type(e).__name__}: {e}")
    return _LOADED[name][2]


@dataclass(frozen=True)
class Backend:
    """One backend: its module ``mefn_fast.backends.<name>`` has ``load()`` (the implementation, or
    :class:`BackendUnavailable`) and optionally ``input_limits(regions, words, opts)``."""

    name: str
    description: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]

    def load(self) -> Optional[Impl]:
        """The implementation, or None (then :meth:`unavailable_reason` says why)."""
        _load(self.name)
        return _LOADED[self.name][0]

    def unavailable_reason(self) -> Optional[str]:
        return _load(self.name)

    def reasons(self, regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> list[str]:
        """Why this backend cannot take these inputs (empty list: it can)."""
        reason = _load(self.name)
        if reason is not None:
            return [reason]
        limits = _LOADED[self.name][1]
        out = []
        if regions.device.type not in self.devices:
            out.append(f"device {regions.device.type} not supported (takes {', '.join(self.devices)})")
        if regions.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"dtype {str(regions.dtype).replace('torch.', '')} not supported (takes {names})")
        if limits is not None and not out:
            out.extend(limits(regions, words, opts))
        return out


_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Preference order for "auto": fastest first. The reference is always last and always available.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", "C++/CUDA extension op (packed blocks, cuBLAS GEMMs, shared per-pair header)",
                ("cuda",), (torch.float16, torch.bfloat16, torch.float32)),
        Backend("triton", "Triton kernels (fused tile, entropy and aggregation)",
                ("cuda",), (torch.float16, torch.bfloat16, torch.float32)),
        Backend("cpu", "C++ CPU extension op (packed blocks, MKL GEMMs, fused per-pair epilogue)",
                ("cpu",), _ALL_FLOATS),
        Backend("reference", "plain PyTorch, materialising, chunked over captions",
                ("cpu", "cuda", "mps", "xpu"), _ALL_FLOATS),
    )
}


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {['auto', *BACKENDS]}")
    return BACKENDS[name]


def backend_status() -> dict[str, Optional[str]]:
    """Every backend with None if it is available on this machine, else the reason it is not."""
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}


def available_backends() -> list[str]:
    """Names of the backends available on this machine, in ``"auto"`` preference order.

    The reasons for the others: :func:`backend_status` or ``python -m mefn_fast.info``.
    """
    return [name for name, reason in backend_status().items() if reason is None]


_chosen: dict = {}  # (name, device, dtype, N, M, options) -> (backend name, implementation)
_announced: set = set()
_fallback_warned: set = set()


def _warn_reference_fallback(regions: torch.Tensor) -> None:
    """Warn, once per backend, when ``"auto"`` lands on the slow reference for inputs that a
    compiled backend would take but cannot load (its reason says why and what to do)."""
    for b in BACKENDS.values():
        if b.name == "reference" or b.name in _fallback_warned:
            continue
        reason = b.unavailable_reason()
        if reason is not None and regions.device.type in b.devices and regions.dtype in b.dtypes:
            _fallback_warned.add(b.name)
            dtype = str(regions.dtype).replace("torch.", "")
            warnings.warn(f"mefn_fast: backend='auto' falls back to the plain-PyTorch 'reference' backend "
                          f"(much slower) for {regions.device.type} {dtype} inputs because the {b.name!r} "
                          f"backend is unavailable: {reason}", RuntimeWarning, stacklevel=4)


def select_backend(name: str, regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> tuple[str, Impl]:
    """Resolve ``name`` ("auto" or a backend) for these inputs; returns (chosen name, implementation).

    The choice depends only on the device, dtype, N, M and options, and is cached on them. Under
    ``torch.compile`` it is made while tracing (guarded on the shapes it reads) and adds no graph break.
    """
    if torch.compiler.is_compiling():
        return _select(name, regions, words, opts)
    key = (name, regions.device, regions.dtype, regions.shape[1], words.shape[1], opts)
    if key not in _chosen:
        _chosen[key] = _select(name, regions, words, opts)
        announce = (_chosen[key][0], regions.device.type, regions.dtype)
        if name == "auto" and announce not in _announced:
            _announced.add(announce)
            log.info("mefn_fast: backend='auto' chose %r for %s %s inputs", *announce)
        if name == "auto" and _chosen[key][0] == "reference":
            _warn_reference_fallback(regions)
    return _chosen[key]


def _select(name: str, regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> tuple[str, Impl]:
    if name == "auto":
        tried = {}
        for b in BACKENDS.values():
            reasons = b.reasons(regions, words, opts)
            if not reasons:
                return b.name, b.load()
            tried[b.name] = reasons
        raise ValueError("no backend can take these inputs: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in tried.items()))
    b = get_backend(name)
    reasons = b.reasons(regions, words, opts)
    if reasons:
        raise ValueError(f"backend={name!r} cannot take these inputs: " + "; ".join(reasons))
    return b.name, b.load()
