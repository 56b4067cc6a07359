"""Triton kernels of mefn_fast: the repository's ``kernels/`` folder, installed as ``mefn_fast.kernels``.

Part of the op layer: the kernels import Triton and torch only. Importing this package imports
nothing heavy; :mod:`mefn_fast.kernels.xattn_similarity` imports Triton and is imported by
:mod:`mefn_fast.backends.triton` (the custom ops, fake kernels and autograd) when the op first runs.
The math is in ``docs/math.md``, the kernels' design in ``docs/design.md``.
"""
