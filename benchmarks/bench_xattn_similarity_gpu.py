"""GPU benchmark of ``xattn_similarity``: the runner (``mefn-fast bench``) on the GPU workloads of
docs/math.md, in the order of the targets they carry.

    python benchmarks/bench_xattn_similarity_gpu.py --out results/ --budget-s 150   # on a CUDA GPU
    python benchmarks/bench_xattn_similarity_gpu.py --dry-run --out /tmp/x          # tiny sizes, on the CPU

This is :mod:`mefn_fast.bench` with the device set to ``cuda`` and three repeats by default:
eval-f30k-gpu fp16, eval-coco5k-gpu bf16, train-gpu bf16, vit-patches bf16, then the fp32 rows,
each beside both cuBLAS floors, the reference and the peers, with CUDA-event timing. Every runner
flag applies (``--budget-s`` skips the workloads it cannot start in time, ``--compile-budget-s``
caps the compiled peer's compilation). The CSV, JSON and markdown in ``--out`` are rewritten after
every workload, so a run that is stopped keeps what it measured. The last lines printed are the
verdicts on the GPU targets (:mod:`mefn_fast.bench.targets`).

``--dry-run`` runs the same plan on the CPU at tiny sizes (the reference, the CPU op where it takes
the dtype, and the eager peers; no memory measurements): a check that the script works end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from mefn_fast.bench import runner, targets


def tiny(w: runner.Workload) -> runner.Workload:
    """A second-long version of a workload (2 images x 8 captions, d <= 32, N <= 40)."""
    return replace(w, b_img=2, b_txt=8, n=min(w.n, 40), d=min(w.d, 32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="the GPU plan at tiny sizes on the CPU")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.dry_run else 3)
    plan = runner.plan_for("cuda", args.workloads)
    resize = None
    if args.dry_run:
        args.device, args.no_memory, resize = "cpu", True, tiny
        if args.peers is None:
            args.peers = ["scan-loop", "sorted-eager"]  # compiling takes a minute on a small CPU
    else:
        args.device = "cuda"
    rc = runner.run(args, resize=resize, plan=plan)
    path = os.path.join(args.out, f"bench-{args.device}.json")
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)["rows"]
        print()
        print(targets.format_verdicts(targets.evaluate(rows, gpu=not args.dry_run)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
