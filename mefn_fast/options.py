"""The options of the cross-attention similarity (``docs/math.md``, section 1) and their validation.

Every backend receives the same frozen :class:`XAttnOptions`, built and checked once by
:func:`make_options`, so a bad option string or hyper-parameter is rejected before any kernel
runs, with a message naming the argument.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DIRECTIONS = ("t2i", "i2t", "both")
ATTN_NORMS = ("none", "clipped_l2norm")
AGGS = ("mean", "lse")


@dataclass(frozen=True)
class XAttnOptions:
    """Hyper-parameters of the similarity (docs/math.md, section 1), with its defaults."""

    direction: str = "t2i"
    lambda_t2i: float = 9.0
    lambda_i2t: float = 4.0
    attn_norm: str = "clipped_l2norm"
    mfe: bool = True
    tau: float = 0.25
    agg: str = "mean"
    lambda_lse: float = 6.0

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value, allowed: tuple) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {allowed}; got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    return value


def _real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # numpy / torch scalars expose __float__; anything else is a type error.
        if hasattr(value, "__float__") and getattr(value, "ndim", 0) == 0:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def make_options(
    direction: str = "t2i",
    lambda_t2i: float = 9.0,
    lambda_i2t: float = 4.0,
    attn_norm: str = "clipped_l2norm",
    mfe: bool = True,
    tau: float = 0.25,
    agg: str = "mean",
    lambda_lse: float = 6.0,
) -> XAttnOptions:
    """Validate the section-2 options and return them frozen.

    Raises ``ValueError`` / ``TypeError`` naming the offending argument: unknown option strings,
    non-finite numbers, ``tau <= 0``, ``lambda_lse <= 0`` and negative attention temperatures.
    """
    if not isinstance(mfe, bool):
        raise TypeError(f"mfe must be a bool; got {type(mfe).__name__}")
    return XAttnOptions(
        direction=_choice("direction", direction, DIRECTIONS),
        lambda_t2i=_real("lambda_t2i", lambda_t2i, nonnegative=True),
        lambda_i2t=_real("lambda_i2t", lambda_i2t, nonnegative=True),
        attn_norm=_choice("attn_norm", attn_norm, ATTN_NORMS),
        mfe=mfe,
        tau=_real("tau", tau, positive=True),
        agg=_choice("agg", agg, AGGS),
        lambda_lse=_real("lambda_lse", lambda_lse, positive=True),
    )
