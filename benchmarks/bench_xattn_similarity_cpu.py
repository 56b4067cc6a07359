"""CPU benchmark of the cross-attention similarity: reference vs the fused "cpu" op vs the
matrix-product floor, on the workloads eval-f30k-cpu and train-cpu of docs/math.md (section 4).

    python benchmarks/bench_xattn_similarity_cpu.py            # full sizes, 5 repeats
    python benchmarks/bench_xattn_similarity_cpu.py --quick    # a quarter of the pairs, 3 repeats

This is the benchmark runner (``mefn-fast bench``, :mod:`mefn_fast.bench`) restricted to the CPU
workloads; every flag of the runner applies (``--backends cpu`` to drop other backends,
``--no-memory``, ``--out``). Every backend is timed in the same run, interleaved: one warm-up,
then the median and quartiles of the repeats; ratios are to the floor and to the reference. Peak
extra memory: each backend runs once more in a fresh subprocess, after a tiny warm-up pass, and
reports the growth of its peak resident set over the call (Linux: ``VmHWM`` reset through
``/proc/self/clear_refs`` just before the call). Tables, CSV and JSON go to ``bench-results/``.
"""
from __future__ import annotations

import sys

from mefn_fast.bench import main

if __name__ == "__main__":
    sys.exit(main(["--device", "cpu", "--workloads", "eval-f30k-cpu", "train-cpu", *sys.argv[1:]]))
