"""GPU benchmark of ``xattn_similarity``: the GPU workloads of docs/math.md (section 4), in one run.

    python benchmarks/bench_xattn_similarity_gpu.py --out results/        # on a CUDA GPU
    python benchmarks/bench_xattn_similarity_gpu.py --dry-run --out /tmp/x # CPU smoke test, tiny sizes

For every workload it times, interleaved and with CUDA events, the matrix-product floor (one
(B_img*N x d) @ (d x B_txt*M) product in the same dtype, plus its two backward products for a
forward+backward pass), the reference, Triton, and CUDA when that backend is available, and
measures each one's peak extra GPU memory (``max_memory_allocated`` beyond the inputs). It
writes ``xattn_similarity_gpu.csv`` (one row per backend and workload, written as it goes, so
that a run cut short keeps what it measured) and ``xattn_similarity_gpu.md`` (a table of
ratios to the floor and to the reference, and the issue's targets).

Time budget (``--budget-s``, default 300): workloads run in priority order and are skipped,
with a note, once the budget is spent. The reference materialises per-caption tensors and runs
one caption per chunk at these sizes, so on the big workloads it is timed on a slice of the
captions (``--ref-captions``, default 500) and its time scaled linearly to all captions (it is
exactly linear in B_txt: a Python loop over caption chunks); such rows say "extrapolated". The
reference is not run at all on eval-coco5k-gpu (it would take far too long).

``--dry-run``: tiny versions of the workloads on the CPU (reference, floor, and Triton when
TRITON_INTERPRET=1), to check that the script runs end to end without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

import mefn_fast
from mefn_fast.bench import runner as bench
from mefn_fast.bench.runner import DTYPES


@dataclass(frozen=True)
class Workload:
    name: str
    b_img: int
    b_txt: int
    n: int
    m: int
    d: int
    dtype: str
    backward: bool
    direction: str = "t2i"
    reference: bool = True

    def flops(self) -> float:
        return 2.0 * self.b_img * self.n * self.b_txt * self.m * self.d * (3 if self.backward else 1)


# The GPU rows of the named workloads (docs/math.md), most important first.
WORKLOADS = [
    Workload("eval-f30k-gpu", 1000, 5000, 36, 32, 1024, "fp16", False),
    Workload("train-gpu", 128, 128, 36, 32, 1024, "bf16", True, direction="both"),
    Workload("eval-f30k-gpu", 1000, 5000, 36, 32, 1024, "bf16", False),
    Workload("eval-f30k-gpu", 1000, 5000, 36, 32, 1024, "fp32", False),
    Workload("vit-patches", 64, 320, 197, 32, 512, "bf16", True),
    Workload("vit-patches", 64, 320, 197, 32, 512, "fp32", True),
    Workload("eval-coco5k-gpu", 5000, 25000, 36, 32, 1024, "bf16", False, reference=False),
]

FIELDS = ["workload", "dtype", "pass", "direction", "backend", "b_img", "b_txt", "n", "m", "d", "repeats",
          "median_ms", "q1_ms", "q3_ms", "vs_floor", "vs_reference", "tflops_floor_equiv", "peak_extra_mib",
          "max_abs_err_vs_reference", "note", "device", "torch", "triton"]


def as_bench(w: Workload, device: str) -> bench.Workload:
    return bench.Workload(w.name, w.b_img, w.b_txt, w.n, w.m, w.d, w.backward, (w.dtype,), device, w.direction)


def make_inputs(w: Workload, device: str, seed: int = 0):
    """The runner's seeded inputs (:func:`mefn_fast.bench.make_inputs`) for this workload's dtype."""
    return bench.make_inputs(as_bench(w, device), device, DTYPES[w.dtype], seed, requires_grad=w.backward)


def make_step(w: Workload, backend: str, inputs):
    regions, rl, words, wl = inputs
    if backend == "floor":  # the runner's floor (column chunks when the product would not fit)
        return bench.make_step(as_bench(w, regions.device.type), "floor", inputs)
    if backend == "triton" and regions.device.type == "cpu":  # --dry-run under the interpreter
        from mefn_fast.backends import triton as tb
        opts = mefn_fast.make_options(direction=w.direction)

        def fwd():
            return tb.xattn_similarity_triton(regions, rl, words, wl, opts)
    else:
        def fwd():
            return mefn_fast.xattn_similarity(regions, rl, words, wl, direction=w.direction, backend=backend)
    if not w.backward:
        return fwd
    grad = torch.randn(w.b_img, w.b_txt, generator=torch.Generator().manual_seed(1)).to(regions.device, regions.dtype)
    return lambda: torch.autograd.grad(fwd(), (regions, words), grad)


def timer(device: str):
    """One timed call of a step: CUDA events on a GPU, perf_counter on the CPU (the runner's)."""
    return lambda step: bench._time_once(step, device)


def peak_extra(step, device: str):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20


def check(w: Workload, backend: str, device: str) -> float:
    """Max |backend - reference| on a small slice of the workload (scores; and gradients if fwd+bwd)."""
    small = replace(w, b_img=3, b_txt=5)
    inputs = make_inputs(small, device, seed=3)
    outs = []
    for name in (backend, "reference"):
        r, rl, t, tl = (x.detach().requires_grad_(w.backward and x.is_floating_point()) for x in inputs)
        s = make_step(replace(small, backward=False), name, (r, rl, t, tl))()
        grads = make_step(small, name, (r, rl, t, tl))() if w.backward else ()
        outs.append([s.detach(), *grads])
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(*outs))


def backends_for(w: Workload, device: str, dry_run: bool) -> list:
    out = []
    if w.reference:
        out.append("reference")
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") == "1" and w.dtype != "bf16":  # the interpreter gets bf16 wrong
            out.append("triton")
        return out
    probe = torch.empty(1, w.n, 1, device=device, dtype=DTYPES[w.dtype])
    probe_w = torch.empty(1, w.m, 1, device=device, dtype=DTYPES[w.dtype])
    for name in ("triton", "cuda"):
        reasons = mefn_fast.backends.BACKENDS[name].reasons(probe, probe_w, mefn_fast.make_options(direction=w.direction))
        if reasons:
            print(f"  {name} skipped on {w.name}: {'; '.join(reasons)}", file=sys.stderr)
        else:
            out.append(name)
    return out


def run_workload(w: Workload, device: str, repeats: int, ref_captions: int, dry_run: bool, env: dict,
                 writer, rows: list) -> None:
    t0 = time.time()
    inputs = make_inputs(w, device)
    names = ["floor", *backends_for(w, device, dry_run)]
    scale_ref = 1.0
    ref_note = ""
    steps = {b: make_step(w, b, inputs) for b in names if b != "reference"}
    if "reference" in names:
        if w.b_txt > ref_captions:
            wr = replace(w, b_txt=ref_captions)
            r, rl, t, tl = inputs
            sl = (r, rl, t.detach()[:ref_captions].requires_grad_(w.backward), tl[:ref_captions])
            steps["reference"] = make_step(wr, "reference", sl)
            scale_ref = w.b_txt / ref_captions
            ref_note = f"extrapolated: timed on {ref_captions} of {w.b_txt} captions, x{scale_ref:g}"
        else:
            steps["reference"] = make_step(w, "reference", inputs)
    errors = {b: check(w, b, device) for b in names if b not in ("floor", "reference")}
    time_once = timer(device)
    times = {b: [] for b in names}
    mem = {}
    warm = {}
    for b in names:  # warm-up (compilation, autotuning, cuBLAS heuristics) and memory
        mem[b] = peak_extra(steps[b], device)
        warm[b] = time_once(steps[b]) if device == "cuda" else 0.0
    if max(warm.values()) > 1.0:  # seconds per pass: fewer repeats keep the run in its budget
        repeats = min(repeats, 3)
    ref_reps = 1 if scale_ref > 1 or w.b_img * w.b_txt >= 10 ** 6 else repeats
    for rep in range(repeats):
        for b in names:
            if b == "reference" and rep >= ref_reps:
                continue
            times[b].append(time_once(steps[b]))
    med = {b: statistics.median(ts) * (scale_ref if b == "reference" else 1.0) for b, ts in times.items()}
    for b in names:
        ts = sorted(times[b])
        sc = scale_ref if b == "reference" else 1.0
        q1, q3 = (ts[len(ts) // 4] * sc, ts[(3 * len(ts)) // 4] * sc) if len(ts) > 1 else (med[b], med[b])
        note = ref_note if b == "reference" else ""
        if b == "reference" and w.reference and mem[b] is not None and scale_ref > 1:
            note += "; memory measured on the slice"
        row = dict(workload=w.name, dtype=w.dtype, direction=w.direction, backend=b, b_img=w.b_img, b_txt=w.b_txt,
                   n=w.n, m=w.m, d=w.d, repeats=len(times[b]), median_ms=med[b] * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3,
                   vs_floor=med[b] / med["floor"],
                   vs_reference=(med["reference"] / med[b]) if "reference" in med else None,
                   tflops_floor_equiv=w.flops() / med[b] / 1e12,
                   peak_extra_mib=mem[b], max_abs_err_vs_reference=errors.get(b), note=note, **env)
        row["pass"] = "fwd+bwd" if w.backward else "fwd"
        writer.writerow({k: row.get(k) for k in FIELDS})
        rows.append(row)
    print(f"  {w.name} {w.dtype}: {', '.join(f'{b} {med[b] * 1e3:.2f} ms' for b in names)} ({time.time() - t0:.0f} s)",
          file=sys.stderr)


# Tile classes, dtypes and option flags that the GPU tests and this benchmark compile (batch sizes
# and d are not specialised on, so tiny batches compile the same kernels): (dtype, N, M, d, options).
_LSE_NONE = dict(direction="both", attn_norm="none", mfe=True, agg="lse")  # OPTION_GRID[21] of the tests
PRECOMPILE = [
    ("bf16", 36, 32, 128, dict(direction="both")), ("bf16", 36, 32, 128, _LSE_NONE),
    ("fp16", 36, 32, 128, dict(direction="both")), ("fp16", 36, 32, 128, _LSE_NONE),
    ("fp32", 36, 32, 512, dict(direction="both")), ("fp32", 1, 1, 1, _LSE_NONE),
    ("fp32", 100, 70, 300, _LSE_NONE),
    ("tf32", 36, 32, 256, dict(direction="t2i")), ("bf16", 197, 32, 512, dict(direction="t2i")),
]


def _compile_one(spec: str) -> None:
    import json
    dt, n, m, d, opts = json.loads(spec)
    if dt == "tf32":
        torch.set_float32_matmul_precision("high")
    dtype = torch.float32 if dt == "tf32" else DTYPES[dt]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, n, d, generator=g).to("cuda", dtype).requires_grad_(True)
    w = torch.randn(3, m, d, generator=g).to("cuda", dtype).requires_grad_(True)
    s = mefn_fast.xattn_similarity(r, None, w, None, backend="triton", **opts)
    s.float().sum().backward()
    torch.cuda.synchronize()


def precompile(timeout_s: float, procs: int) -> None:
    """Compile the Triton kernels of PRECOMPILE in parallel processes, filling Triton's disk cache."""
    import json
    import subprocess
    t0 = time.time()
    pending = [json.dumps(list(j)) for j in PRECOMPILE]
    running = []
    failures = []
    while pending or running:
        while pending and len(running) < procs:
            spec = pending.pop(0)
            running.append((spec, subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_compile-one", spec],
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        time.sleep(0.5)
        for spec, proc in list(running):
            if proc.poll() is not None:
                running.remove((spec, proc))
                if proc.returncode != 0:
                    failures.append(spec)
                    print(f"  precompile {spec} FAILED:\n{proc.stdout.read()[-3000:]}", file=sys.stderr)
        if time.time() - t0 > timeout_s:
            for spec, proc in running:
                proc.kill()
                failures.append(spec + " (timed out)")
            break
    print(f"precompiled {len(PRECOMPILE) - len(failures)}/{len(PRECOMPILE)} kernel sets in {time.time() - t0:.0f} s"
          + (f"; failed: {failures}" if failures else ""), file=sys.stderr)


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(rows: list, env: dict, skipped: list) -> str:
    lines = [f"# xattn_similarity on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, python {platform.python_version()}; "
             f"CUDA-event timing, median of the repeats after a warm-up; floor = one (B_img*N x d) @ (d x B_txt*M) "
             "matmul in the same dtype (x3 products with backward).", "",
             "| workload | dtype | pass | backend | median ms | x floor | speed-up vs reference | peak extra MiB | max err | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['pass']} | {r['backend']} | {_fmt(r['median_ms'], '.3f')} | "
                     f"{_fmt(r['vs_floor'], '.2f')} | {_fmt(r['vs_reference'], '.1f')} | {_fmt(r['peak_extra_mib'], '.1f')} | "
                     f"{_fmt(r['max_abs_err_vs_reference'], '.2e')} | {r['note']} |")
    lines += ["", "## Targets (Triton)", ""]

    def get(wl, dt, b):
        return next((r for r in rows if r["workload"] == wl and r["dtype"] == dt and r["backend"] == b), None)

    for b in ("triton", "cuda"):
        e = get("eval-f30k-gpu", "fp16", b)
        if e:
            ok = (e["vs_reference"] or 0) >= 20 and e["vs_floor"] <= 2
            lines.append(f"- {b} eval-f30k-gpu fp16 forward: {_fmt(e['vs_reference'], '.1f')}x faster than the reference "
                         f"(target >= 20), {e['vs_floor']:.2f}x the cuBLAS floor (target <= 2): {'MET' if ok else 'NOT MET'}")
        t, tr = get("train-gpu", "bf16", b), get("train-gpu", "bf16", "reference")
        if t:
            ok = (t["vs_reference"] or 0) >= 5
            lines.append(f"- {b} train-gpu bf16 fwd+bwd: {_fmt(t['vs_reference'], '.1f')}x faster than the reference "
                         f"(target >= 5): {'MET' if ok else 'NOT MET'}")
            if tr and t["peak_extra_mib"] is not None and tr["peak_extra_mib"]:
                ratio = t["peak_extra_mib"] / tr["peak_extra_mib"]
                lines.append(f"- {b} train-gpu peak extra memory: {ratio:.3f} of the reference's (target <= 0.1): "
                             f"{'MET' if ratio <= 0.1 else 'NOT MET'}")
    lines += ["", "The reference is not run on eval-coco5k-gpu (hours); on eval-f30k-gpu it is timed on a slice of the "
              "captions and scaled linearly (see the note column)."]
    if skipped:
        lines += ["", "Skipped for the time budget: " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--ref-captions", type=int, default=500)
    p.add_argument("--only", default="", help="comma list of workload names")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    p.add_argument("--precompile", type=float, default=0.0, metavar="SECONDS",
                   help="only compile the Triton kernels of the GPU tests and workloads, in parallel, then exit")
    p.add_argument("--procs", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--_compile-one", dest="compile_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile_one:
        _compile_one(args.compile_one)
        return 0
    if args.precompile:
        if not torch.cuda.is_available():
            print(f"precompile: no CUDA GPU; would compile {len(PRECOMPILE)} kernel sets", file=sys.stderr)
            return 0
        precompile(args.precompile, args.procs)
        return 0
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if (torch.cuda.is_available() and not args.dry_run) else "cpu"
    if device == "cpu" and not args.dry_run:
        print("no CUDA GPU: use --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
               torch=torch.__version__, triton=triton_version)
    workloads = WORKLOADS
    if args.only:
        keep = set(args.only.split(","))
        workloads = [w for w in workloads if w.name in keep]
    if args.dry_run:
        workloads = [replace(w, b_img=2, b_txt=3 if w.reference else 4, d=min(w.d, 48)) for w in workloads]
        args.repeats = min(args.repeats, 2)
    start = time.time()
    rows, skipped = [], []
    csv_path = os.path.join(args.out, "xattn_similarity_gpu.csv")
    md_path = os.path.join(args.out, "xattn_similarity_gpu.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for w in workloads:
            if time.time() - start > args.budget_s:
                skipped.append(f"{w.name} {w.dtype}")
                continue
            try:
                run_workload(w, device, args.repeats, args.ref_captions, args.dry_run, env, writer, rows)
            except Exception as e:  # one failing workload must not lose the others
                print(f"  {w.name} {w.dtype} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                skipped.append(f"{w.name} {w.dtype} (failed: {type(e).__name__}: {str(e)[:200]})")
                if device == "cuda":
                    torch.cuda.empty_cache()
            f.flush()
            with open(md_path, "w") as md:
                md.write(markdown(rows, env, skipped))
    with open(md_path, "w") as md:
        md.write(markdown(rows, env, skipped))
    print(open(md_path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
