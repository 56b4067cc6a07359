"""Drop-in replacements for functions of other image-text matching code bases (op layer: imports
``mefn_fast.api`` only).

``mefn_fast.compat.scan``: SCAN's ``xattn_score_t2i`` / ``xattn_score_i2t`` backed by the fused op.
"""
from . import scan

__all__ = ["scan"]
