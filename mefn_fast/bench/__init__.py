"""The benchmark suite (``mefn-fast bench``, ``python -m mefn_fast.bench``): every available backend
of ``xattn_similarity`` against the reference and the matrix-product floors, interleaved in one
run, on the named workloads of ``docs/math.md``.

An application: it imports the op layer (``mefn_fast.xattn_similarity`` and the backends) and
nothing imports it but the CLI and ``benchmarks/``.
"""
from .runner import DTYPES, WORKLOADS, Workload, add_arguments, main, run

__all__ = ["DTYPES", "WORKLOADS", "Workload", "add_arguments", "main", "run"]
