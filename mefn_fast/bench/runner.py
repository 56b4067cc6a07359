"""The benchmark runner: every available backend on the named workloads of docs/math.md, in one run.

    python -m mefn_fast.bench                 # the workloads that fit this device
    python -m mefn_fast.bench --quick         # reduced sizes, under two minutes on a 2-core CPU
    python -m mefn_fast.bench --scaling       # time and memory as B_txt, N and d grow

Backends are interleaved (each repeat times every backend once, in turn) so that drift in clock
speed or load hits all of them alike. Each row reports the median and quartiles of the repeats
after a warm-up, the ratio to the reference and to the matrix-product floor measured in the same
run, the achieved GFLOP/s (the floor's FLOPs divided by the time) and the peak extra memory,
measured for each backend in a fresh subprocess (CPU: peak RSS growth; GPU: peak allocated
bytes beyond the inputs). The floor of a forward pass is one matrix product of all region rows
by all word rows, (B_img*N x d) @ (d x B_txt*M); of a forward+backward pass, that product and the
two products of its backward.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

import mefn_fast

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class Workload:
    """One named workload (docs/math.md, section 4)."""

    name: str
    b_img: int
    b_txt: int
    n: int
    m: int
    d: int
    backward: bool
    dtypes: tuple
    device: str  # "cpu", "cuda" or "both"
    direction: str = "t2i"
    m_min: int = 8

    def flops(self) -> float:
        """FLOPs of the floor: one (B_img*N x d) @ (d x B_txt*M) product, three with backward."""
        return 2.0 * self.b_img * self.n * self.b_txt * self.m * self.d * (3 if self.backward else 1)

    def scaled(self, factor: float) -> "Workload":
        return replace(self, b_img=max(1, int(self.b_img * factor)), b_txt=max(1, int(self.b_txt * factor)))


WORKLOADS = {w.name: w for w in (
    Workload("eval-f30k-cpu", 128, 640, 36, 32, 1024, False, ("fp32",), "cpu"),
    Workload("train-cpu", 64, 64, 36, 32, 1024, True, ("fp32",), "cpu", direction="both"),
    Workload("eval-f30k-gpu", 1000, 5000, 36, 32, 1024, False, ("fp16", "bf16", "fp32"), "cuda"),
    Workload("eval-coco5k-gpu", 5000, 25000, 36, 32, 1024, False, ("bf16",), "cuda"),
    Workload("train-gpu", 128, 128, 36, 32, 1024, True, ("bf16",), "cuda", direction="both"),
    Workload("vit-patches", 64, 320, 197, 32, 512, True, ("fp32", "bf16"), "both"),
)}
QUICK_FACTOR = 0.25  # --quick: a quarter of the images and captions
# The reference is linear in B_txt (a Python loop over caption chunks). Beyond this many pairs, or
# (forward+backward, where autograd keeps every chunk's intermediates: about 16 x M x (N + d) fp32
# values a pair) beyond this many bytes, it is timed on a slice of the captions and its time scaled
# up: eval-coco5k-gpu would take hours, vit-patches' backward would need 23 GiB.
REFERENCE_MAX_PAIRS = 10 ** 6
REFERENCE_MAX_BYTES = 10 * 2 ** 30
# The floor's product is computed in column chunks of at most this many elements, into one reused
# buffer, when the whole (B_img*N) x (B_txt*M) product would not fit (eval-coco5k-gpu: 144e9).
FLOOR_MAX_ELEMENTS = 2 ** 28


def make_inputs(w: Workload, device: str, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    """Seeded inputs of a workload: full-length regions, word lengths uniform in [m_min, m]."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(w.b_img, w.n, w.d, generator=g).to(device, dtype).requires_grad_(requires_grad)
    words = torch.randn(w.b_txt, w.m, w.d, generator=g).to(device, dtype).requires_grad_(requires_grad)
    region_lengths = torch.full((w.b_img,), w.n, device=device)
    word_lengths = torch.randint(min(w.m_min, w.m), w.m + 1, (w.b_txt,), generator=g).to(device)
    return regions, region_lengths, words, word_lengths


def make_step(w: Workload, backend: str, inputs) -> Callable[[], object]:
    """A closure running one pass of ``backend`` ("floor" for the matrix-product floor)."""
    regions, region_lengths, words, word_lengths = inputs
    if backend == "floor":
        return _floor_step(w, regions, words)

    def forward():
        return mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, direction=w.direction,
                                          backend=backend)
    if not w.backward:
        return forward
    grad = torch.randn(w.b_img, w.b_txt, generator=torch.Generator().manual_seed(1)).to(regions.device, regions.dtype)
    return lambda: torch.autograd.grad(forward(), (regions, words), grad)


def _floor_step(w: Workload, regions: torch.Tensor, words: torch.Tensor) -> Callable[[], object]:
    """All region rows times all word rows: one product, or (forward, when the product exceeds
    FLOOR_MAX_ELEMENTS) the same FLOPs in column chunks written into one reused buffer."""
    a, b = regions.reshape(-1, w.d), words.reshape(-1, w.d)
    if w.backward:
        grad = torch.ones(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)
        return lambda: torch.autograd.grad(torch.matmul(a, b.t()), (a, b), grad)
    cols = max(1, FLOOR_MAX_ELEMENTS // a.shape[0])
    if cols >= b.shape[0]:
        return lambda: torch.matmul(a, b.t())
    buf = torch.empty(a.shape[0] * cols, device=a.device, dtype=a.dtype)

    def chunked():
        for j in range(0, b.shape[0], cols):
            bj = b[j:j + cols]
            torch.matmul(a, bj.t(), out=buf[:a.shape[0] * bj.shape[0]].view(a.shape[0], bj.shape[0]))
        return buf
    return chunked


def reference_captions(w: Workload) -> int:
    """How many of the workload's captions the reference is timed on (see REFERENCE_MAX_PAIRS)."""
    pairs = REFERENCE_MAX_PAIRS
    if w.backward:
        pairs = min(pairs, int(REFERENCE_MAX_BYTES // (16 * w.m * (w.n + w.d) * 4)))
    return min(w.b_txt, max(1, pairs // w.b_img))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def check_against_reference(w: Workload, backend: str, device: str, dtype: torch.dtype) -> float:
    """Max |backend - reference| on a small version of the workload (forward and gradients)."""
    small = replace(w, b_img=3, b_txt=5)
    inputs = make_inputs(small, device, dtype, seed=3, requires_grad=True)
    outs = []
    for name in (backend, "reference"):
        r, rl, t, tl = inputs
        s = mefn_fast.xattn_similarity(r, rl, t, tl, direction=w.direction, backend=name)
        grads = torch.autograd.grad(s.sum(), (r, t))
        outs.append([s, *grads])
    return max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(*outs))


def peak_extra_memory(w: Workload, backend: str, device: str, dtype_name: str) -> Optional[float]:
    """Peak extra memory (bytes) of one pass, measured in a fresh subprocess."""
    cmd = [sys.executable, "-m", "mefn_fast.bench", "--_memory", json.dumps(asdict(w)), backend, device, dtype_name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
        return float(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _memory_child(spec: str, backend: str, device: str, dtype_name: str) -> None:
    w = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec).items()})
    dtype = DTYPES[dtype_name]
    # One pass on a tiny version first: loading the extension, compiling kernels and starting the
    # thread pool are one-time costs, not the pass's memory.
    tiny = replace(w, b_img=2, b_txt=2)
    make_step(tiny, backend, make_inputs(tiny, device, dtype, requires_grad=w.backward))()
    inputs = make_inputs(w, device, dtype, requires_grad=w.backward)
    step = make_step(w, backend, inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - base)
    else:
        # Reset the kernel's high-water mark (importing torch peaks above what it keeps), then
        # compare the peak resident set during the step with the resident set before it.
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        step()
        peak = _rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(max(0, peak - base))


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _quartiles(xs: list) -> tuple:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:  # tqdm comes with the "train" extra; the runner works without it
        class _Plain:
            def update(self, k=1):
                pass

            def set_postfix_str(self, s):
                print(f"  {desc}: {s}", file=sys.stderr)

            def close(self):
                pass

        return _Plain()


def run_workload(w: Workload, device: str, dtype_name: str, backends: list, repeats: int, warmup: int = 1,
                 memory: bool = True, verify: bool = True) -> list:
    """Time every backend and the floor on one workload, interleaved; returns one row per backend."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(w, device, dtype, requires_grad=w.backward)
    names = ["floor", *backends]
    steps = {b: make_step(w, b, inputs) for b in names}
    sizes = {b: w for b in names}  # the workload each backend is timed (and its memory measured) on
    scale = {b: 1.0 for b in names}
    if "reference" in names and reference_captions(w) < w.b_txt:
        k = reference_captions(w)
        regions, region_lengths, words, word_lengths = inputs
        sizes["reference"] = replace(w, b_txt=k)
        scale["reference"] = w.b_txt / k
        steps["reference"] = make_step(sizes["reference"], "reference", (
            regions, region_lengths, words.detach()[:k].requires_grad_(w.backward), word_lengths[:k]))
    errors = {b: (check_against_reference(w, b, device, dtype) if verify and b not in ("floor", "reference") else None)
              for b in names}
    bar = _progress(len(names) * (warmup + repeats), f"{w.name} {dtype_name}")
    times = {b: [] for b in names}
    for rep in range(warmup + repeats):
        for b in names:
            bar.set_postfix_str(f"{b} {rep + 1}/{warmup + repeats}")
            t = _time_once(steps[b], device) * scale[b]
            if rep >= warmup:
                times[b].append(t)
            bar.update()
    bar.close()
    mem = {b: (peak_extra_memory(sizes[b], b, device, dtype_name) if memory else None) for b in names}
    floor_median = statistics.median(times["floor"])
    ref_median = statistics.median(times["reference"]) if "reference" in times else None
    ref_mem = mem.get("reference")
    rows = []
    for b in names:
        q1, med, q3 = _quartiles(times[b])
        rows.append(dict(
            workload=w.name, device=device, dtype=dtype_name, pass_="fwd+bwd" if w.backward else "fwd", backend=b,
            b_img=w.b_img, b_txt=w.b_txt, n=w.n, m=w.m, d=w.d, direction=w.direction, repeats=repeats,
            median_s=med, q1_s=q1, q3_s=q3,
            vs_reference=(ref_median / med) if ref_median else None,  # > 1: faster than the reference
            vs_floor=med / floor_median,  # >= 1: how many floors it costs
            gflops=w.flops() / med / 1e9, peak_extra_bytes=mem[b],
            memory_vs_reference=(mem[b] / ref_mem) if ref_mem and mem[b] is not None else None,
            max_abs_err_vs_reference=errors[b],
            note=(f"timed on {sizes[b].b_txt} of {w.b_txt} captions, time x{scale[b]:.3g}; memory of that slice"
                  if scale[b] > 1 else "")))
    return rows


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), commit=commit or "unknown", python=platform.python_version(),
                torch=torch.__version__, mefn_fast=mefn_fast.__version__, cpu=platform.processor() or platform.machine(),
                cpu_threads=torch.get_num_threads(), gpu=gpu, backends=mefn_fast.available_backends())


def backends_for(device: str, dtype: torch.dtype, requested: Optional[list]) -> list:
    """The available backends that take this device and dtype (the reference always included)."""
    probe = torch.empty(1, 1, 1, device=device, dtype=dtype)
    opts = mefn_fast.make_options()
    out = []
    for name, b in mefn_fast.backends.BACKENDS.items():
        if requested and name not in requested and name != "reference":
            continue
        if not b.reasons(probe, probe, opts):
            out.append(name)
    return out


def _fmt_bytes(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**20:.0f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:.0f} KiB"


def format_table(rows: list) -> str:
    head = ("| workload | B_img x B_txt, N, M, d | dtype | pass | backend | median | q1-q3 | vs reference | vs floor | "
            "GFLOP/s | peak extra mem | mem vs reference |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        vs_ref = f"{r['vs_reference']:.1f}x faster" if r["vs_reference"] else "-"
        if r["backend"] == "reference":
            vs_ref = "1.0x"
        backend = r["backend"] + (" *" if r.get("note") else "")
        lines.append(f"| {r['workload']} | {r['b_img']} x {r['b_txt']}, {r['n']}, {r['m']}, {r['d']} | {r['dtype']} | {r['pass_']} | {backend} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['q1_s'] * 1e3:.1f}-{r['q3_s'] * 1e3:.1f} ms | {vs_ref} | {r['vs_floor']:.2f}x | "
                     f"{r['gflops']:.0f} | {_fmt_bytes(r['peak_extra_bytes'])} | "
                     f"{'-' if r.get('memory_vs_reference') is None else format(r['memory_vs_reference'], '.3f')} |")
    lines += [f"\n\\* {r['workload']} {r['dtype']} {r['backend']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines)


def write_outputs(rows: list, env: dict, out_dir: str, stem: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*env.keys(), *rows[0].keys()])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: (",".join(v) if isinstance(v, list) else v) for k, v in env.items()}, **r})
    with open(paths[1], "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
    with open(paths[2], "w") as f:
        f.write(f"{env['date']}, commit {env['commit']}, torch {env['torch']}, {env['gpu'] or env['cpu']} "
                f"({env['cpu_threads']} threads)\n\n{format_table(rows)}\n")
    return paths


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without the "plot" extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_rows(rows: list, path: str) -> Optional[str]:
    """Bar chart: each backend's time as a multiple of the floor, per workload (log scale)."""
    plt = _pyplot()
    if plt is None:
        return None
    groups = sorted({(r["workload"], r["dtype"]) for r in rows}, key=lambda g: [r["workload"] for r in rows].index(g[0]))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, g in enumerate(groups):
            for r in rows:
                if (r["workload"], r["dtype"]) == g and r["backend"] == b:
                    xs.append(i + j * width)
                    ys.append(r["vs_floor"])
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{w}\n{d}" for w, d in groups])
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("time / matrix-product floor (log)")
    ax.set_title("mefn_fast backends vs the floor (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SCALING_AXES = {"b_txt": [64, 128, 256, 512, 1024, 2048, 4096], "n": [36, 100, 197], "d": [256, 512, 1024]}


def run_scaling(device: str, dtype_name: str, backends: list, repeats: int, quick: bool, time_budget_s: float,
                base: Optional[Workload] = None, axes: Optional[dict] = None) -> list:
    """Vary B_txt, N and d one at a time around a base workload; skip a backend once a point exceeds the budget."""
    if base is None:
        base = Workload("scaling", 64 if device == "cuda" else 16, 256, 36, 32, 1024, False, (dtype_name,), device)
    rows = []
    for axis, values in (axes or SCALING_AXES).items():
        if quick:
            values = values[:4] if axis == "b_txt" else values[:2]
        too_slow: set = set()
        for v in values:
            w = replace(base, name=f"scaling-{axis}", **{axis: v})
            run_backends = [b for b in backends if b not in too_slow]
            for r in run_workload(w, device, dtype_name, run_backends, repeats, memory=True, verify=False):
                r["axis"], r["value"] = axis, v
                rows.append(r)
                if r["backend"] != "floor" and r["median_s"] > time_budget_s:
                    too_slow.add(r["backend"])
    return rows


def plot_scaling(rows: list, path: str) -> Optional[str]:
    plt = _pyplot()
    if plt is None:
        return None
    axes = list(dict.fromkeys(r["axis"] for r in rows))
    fig, grid = plt.subplots(2, len(axes), figsize=(4.2 * len(axes), 7), squeeze=False)
    for j, axis in enumerate(axes):
        for b in dict.fromkeys(r["backend"] for r in rows):
            pts = [(r["value"], r["median_s"], r["peak_extra_bytes"]) for r in rows if r["axis"] == axis and r["backend"] == b]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            grid[0][j].plot(xs, [p[1] * 1e3 for p in pts], marker="o", label=b)
            grid[1][j].plot(xs, [(p[2] or 0) / 2**20 for p in pts], marker="o", label=b)
        for i, ylabel in enumerate(("median time (ms)", "peak extra memory (MiB)")):
            grid[i][j].set_xscale("log", base=2)
            grid[i][j].set_yscale("log" if i == 0 else "linear")
            grid[i][j].set_xlabel(axis)
            grid[i][j].set_ylabel(ylabel)
        grid[0][j].legend(fontsize=8)
    fig.suptitle("cost as the work grows (other sizes fixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The runner's flags (shared by ``python -m mefn_fast.bench`` and ``mefn-fast bench``)."""
    p.add_argument("--workloads", nargs="*", default=None, choices=sorted(WORKLOADS),
                   help="workloads to run (default: every workload for this device)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="backends to include besides the reference (default: every available one)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help=f"reduced sizes ({QUICK_FACTOR}x images and captions), fewer repeats")
    p.add_argument("--scaling", action="store_true", help="also run the scaling study (B_txt, N, d)")
    p.add_argument("--scaling-only", action="store_true", help="run only the scaling study")
    p.add_argument("--no-memory", action="store_true", help="skip the per-backend memory subprocesses")
    p.add_argument("--out", default="bench-results", help="folder for the CSV, JSON, markdown table and PNG plots")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; returns an exit code."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    env = environment()
    print(f"mefn_fast bench on {env['gpu'] or env['cpu']} ({device}, {env['cpu_threads']} threads), "
          f"torch {env['torch']}, commit {env['commit']}")
    rows = []
    if not args.scaling_only:
        names = args.workloads or [n for n, w in WORKLOADS.items() if w.device in (device, "both")]
        for name in names:
            w = WORKLOADS[name]
            if w.device not in (device, "both"):
                print(f"skipping {name}: it is a {w.device} workload")
                continue
            if args.quick:
                w = w.scaled(QUICK_FACTOR)
            for dtype_name in (w.dtypes if device == "cuda" else [d for d in w.dtypes if d in ("fp32", "fp64")]):
                backends = backends_for(device, DTYPES[dtype_name], args.backends)
                rows += run_workload(w, device, dtype_name, backends, repeats, memory=not args.no_memory)
        if rows:
            print()
            print(format_table(rows))
            paths = write_outputs(rows, env, args.out, f"bench-{device}")
            png = plot_rows(rows, os.path.join(args.out, f"bench-{device}.png"))
            print("\nwrote " + ", ".join(paths + ([png] if png else [])))
    if args.scaling or args.scaling_only:
        dtype_name = "fp32" if device == "cpu" else "bf16"
        backends = backends_for(device, DTYPES[dtype_name], args.backends)
        srows = run_scaling(device, dtype_name, backends, max(1, repeats // 2), args.quick,
                            time_budget_s=2.0 if args.quick else 20.0)
        print()
        print(format_table(srows))
        paths = write_outputs(srows, env, args.out, f"scaling-{device}")
        png = plot_scaling(srows, os.path.join(args.out, f"scaling-{device}.png"))
        print("\nwrote " + ", ".join(paths + ([png] if png else [])))
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_memory"]:  # internal: one measurement in a fresh process
        _memory_child(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(prog="python -m mefn_fast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
