"""CPU benchmark of the cross-attention similarity: reference vs the fused "cpu" op vs the
matrix-product floor, on the workloads eval-f30k-cpu and train-cpu of SPEC section 6.

    python benchmarks/bench_xattn_similarity_cpu.py            # full sizes, 5 repeats
    python benchmarks/bench_xattn_similarity_cpu.py --quick    # small sizes, a smoke test

Every backend of a workload is timed in the same run: one warm-up call, then the median (and
min / max) of ``--repeats`` calls. The floor is the one matrix product of the same size,
(B_img*N x d) @ (d x B_txt*M) with torch.matmul; for a forward+backward workload it is that
product's forward and backward (three products). Ratios are to the floor and to the reference.
Peak extra memory: each backend runs once more in a fresh subprocess, which reports the growth
of its peak resident set over the call, after its inputs exist and the op is loaded (on Linux:
the peak ``VmHWM`` is reset through ``/proc/self/clear_refs`` just before the call, because
``ru_maxrss`` remembers the larger peak of importing torch; elsewhere ``ru_maxrss``). Rows are also written as JSON to ``bench-results/`` (a build output, not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

WORKLOADS = {
    # name: (b_img, b_txt, n, m_max, m_min, d, backward, options)
    "eval-f30k-cpu": (128, 640, 36, 32, 8, 1024, False, dict(direction="t2i")),
    "train-cpu": (64, 64, 36, 32, 8, 1024, True, dict(direction="both")),
}
QUICK = {  # same shapes per pair, fewer pairs and a smaller d
    "eval-f30k-cpu": (32, 80, 36, 32, 8, 256, False, dict(direction="t2i")),
    "train-cpu": (16, 16, 36, 32, 8, 256, True, dict(direction="both")),
}
BACKENDS = ("reference", "cpu", "floor")


def make_inputs(spec, seed=0):
    b_img, b_txt, n, m_max, m_min, d, backward, _ = spec
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b_img, n, d, generator=g)
    words = torch.randn(b_txt, m_max, d, generator=g)
    region_lengths = torch.full((b_img,), n, dtype=torch.int64)
    word_lengths = torch.randint(m_min, m_max + 1, (b_txt,), generator=g)
    if backward:
        regions.requires_grad_(True)
        words.requires_grad_(True)
    return regions, region_lengths, words, word_lengths


def make_call(backend, spec, inputs):
    """A no-argument function running one forward (and backward) of the workload."""
    import mefn_fast

    regions, rl, words, wl = inputs
    backward, opts = spec[6], spec[7]
    if backend == "floor":
        a, b = regions.reshape(-1, regions.shape[-1]), words.reshape(-1, words.shape[-1])

        def call():
            out = torch.matmul(a, b.t())
            if backward:
                torch.autograd.grad(out, (regions, words), torch.ones_like(out))
        return call

    def call():
        s = mefn_fast.xattn_similarity(regions, rl, words, wl, backend=backend, **opts)
        if backward:
            torch.autograd.grad(s.sum(), (regions, words))
    return call


def time_backend(backend, spec, repeats):
    call = make_call(backend, spec, make_inputs(spec))
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def child_peak_memory(workload, backend, quick):
    """Run in a fresh process: peak RSS growth (bytes) of one call after inputs and op are loaded."""
    spec = (QUICK if quick else WORKLOADS)[workload]
    inputs = make_inputs(spec)
    call = make_call(backend, spec, inputs)
    if backend != "floor":  # load the backend (and the extension) before the baseline
        import mefn_fast
        from mefn_fast.backends import get_backend

        get_backend(backend).load()
        small = make_inputs((2, 2) + spec[2:4] + (spec[4], 8, spec[6], spec[7]))
        make_call(backend, spec, small)()
    if _reset_peak_rss():  # Linux: VmHWM reset to the current RSS, so the peak is the call's own
        before = _status_kib("VmRSS")
        call()
        return (_status_kib("VmHWM") - before) * 1024
    # elsewhere: ru_maxrss, which also remembers the (larger) peak of importing torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_memory(workload, backend, quick):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, backend] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return int(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 5, 2 with --quick)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", default="bench-results", help="folder for the JSON rows")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(child_peak_memory(args.child[0], args.child[1], args.quick))
        return
    repeats = args.repeats or (2 if args.quick else 5)
    table = QUICK if args.quick else WORKLOADS
    import mefn_fast

    env = dict(device=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=torch.get_num_threads(),
               torch=torch.__version__, mefn_fast=mefn_fast.__version__, python=platform.python_version())
    print(f"# {env}")
    print(f"# repeats={repeats} (after 1 warm-up), quick={args.quick}")
    rows = []
    for wl in args.workloads:
        spec = table[wl]
        med = {}
        for backend in args.backends:
            times = time_backend(backend, spec, repeats)
            mem = None if args.no_memory else peak_memory(wl, backend, args.quick)
            med[backend] = statistics.median(times)
            rows.append(dict(workload=wl, backend=backend, shape=list(spec[:6]), backward=spec[6], options=spec[7],
                             median_s=med[backend], min_s=min(times), max_s=max(times), repeats=repeats,
                             peak_extra_bytes=mem, **env))
        for r in rows:
            if r["workload"] == wl:
                r["x_floor"] = r["median_s"] / med["floor"] if "floor" in med else None
                r["speedup_vs_reference"] = med["reference"] / r["median_s"] if "reference" in med else None
        ref_mem = next((r["peak_extra_bytes"] for r in rows if r["workload"] == wl and r["backend"] == "reference"), None)
        for r in rows:
            if r["workload"] == wl and ref_mem and r["peak_extra_bytes"] is not None:
                r["memory_vs_reference"] = r["peak_extra_bytes"] / ref_mem

    print("| workload | pass | backend | median s (min-max) | x floor | speed-up vs reference | peak extra MiB | memory vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        memr = f"{r['memory_vs_reference']:.3f}" if r.get("memory_vs_reference") is not None else "-"
        xf = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
        sp = f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") is not None else "-"
        pas = "fwd+bwd" if r["backward"] else "fwd"
        print(f"| {r['workload']} | {pas} | {r['backend']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) "
              f"| {xf} | {sp} | {mem} | {memr} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_xattn_similarity_cpu{'_quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"# rows written to {path}")


if __name__ == "__main__":
    main()
