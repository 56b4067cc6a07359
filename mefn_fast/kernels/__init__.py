"""Triton kernels of mefn_fast (installed with the package as ``mefn_fast.kernels``).

Importing this package imports nothing heavy; :mod:`mefn_fast.kernels.xattn_similarity` imports
Triton and is only imported by :mod:`mefn_fast.triton_backend` when the op first runs.
"""
