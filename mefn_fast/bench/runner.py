"""The benchmark runner: every available backend on the named workloads of docs/math.md, in one run.

    python -m mefn_fast.bench                 # the workloads that fit this device
    python -m mefn_fast.bench --quick         # reduced sizes, a few minutes on a 2-core CPU
    python -m mefn_fast.bench --scaling       # time and memory as B_txt, N and d grow

Each workload times, interleaved (each repeat runs everything once, in turn, so that drift in
clock speed or load hits all alike):

- the two matrix-product floors (docs/math.md, section 4): the **padded** floor, one product of all
  region rows by all word rows, (B_img*N x d) @ (d x B_txt*M), and the **packed** floor, one
  product of the valid rows only, (sum region_lengths x d) @ (d x sum word_lengths); with
  backward, each is that product and the two products of its gradient;
- every available fused backend, and the reference;
- the peers of :mod:`mefn_fast.bench.peers`: SCAN's per-caption loop, length-sorted Gram-form
  eager code, and that code under ``torch.compile`` (its compilation is excluded and reported).

Each row reports the median and quartiles of the repeats after a warm-up, its ratio to both
floors, to the reference and to the strongest peer (the fastest of the reference and the three
peers: every "x faster" is read against it), the achieved GFLOP/s (the padded floor's FLOPs over
the time) and the peak extra memory (CPU: peak RSS growth in a fresh subprocess; GPU: peak
allocated bytes beyond the inputs). Before timing, every backend and peer is checked against the
reference on a small version of the workload; each fused backend's repeats are also compared
bitwise (the ``deterministic`` column).
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

from .peers import CHUNK, PEER_NAMES, make_peers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
FLOORS = ("padded-floor", "packed-floor")
PEERS = PEER_NAMES
YARDSTICKS = ("reference", *PEERS)  # "x faster" is read against the fastest of these
# Largest |backend - reference| (scores and gradients) accepted on the check before timing; a row
# beyond it says MISMATCH. fp32: a few hundred ulps of a score; half precision: the products' rounding.
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2}


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
        """FLOPs of the padded floor: one (B_img*N x d) @ (d x B_txt*M) product, three with backward."""
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
# On a GPU, the workloads in the order of the targets they carry: a run cut short by its budget
# (--budget-s) loses the least important ones.
GPU_PLAN = (("eval-f30k-gpu", "fp16"), ("eval-coco5k-gpu", "bf16"), ("train-gpu", "bf16"), ("vit-patches", "bf16"),
            ("eval-f30k-gpu", "fp32"), ("vit-patches", "fp32"), ("eval-f30k-gpu", "bf16"))
QUICK_FACTOR = 0.25  # --quick: a quarter of the images and captions
# The reference and SCAN's loop are Python loops over captions, linear in B_txt; the sorted peers
# loop over chunks of captions. Beyond these many pairs, or (forward+backward, where autograd keeps
# every caption's or chunk's intermediates) beyond EAGER_MAX_BYTES of saved activations, they are
# timed on a slice of the captions and their time scaled up: eval-coco5k-gpu would take hours.
LOOP_MAX_PAIRS = 10 ** 6
SORTED_MAX_PAIRS = 2 * 10 ** 7
EAGER_MAX_BYTES = 10 * 2 ** 30  # on a GPU: a third of its memory, if that is more
# The floors' products are computed in column chunks of at most this many elements, into one reused
# buffer, when the whole product would not fit (eval-coco5k-gpu: 144e9 padded, 90e9 packed).
FLOOR_MAX_ELEMENTS = 2 ** 28


def _saved_bytes_per_pair(w: Workload, name: str) -> int:
    """An upper estimate of the activations autograd keeps per image x caption pair (fp32)."""
    if name in ("reference", "scan-loop"):  # per caption: d-wide attended vectors and the tile
        return 16 * w.m * (w.n + w.d) * 4
    return 16 * w.n * w.m * 4  # the sorted peers: tile-sized intermediates only


def eager_max_bytes(device: str) -> int:
    if device == "cuda" and torch.cuda.is_available():
        return max(EAGER_MAX_BYTES, torch.cuda.get_device_properties(0).total_memory // 3)
    return EAGER_MAX_BYTES


def timed_captions(w: Workload, name: str, device: str = "cpu") -> int:
    """How many of the workload's captions ``name`` is timed on (all but for the eager loops)."""
    if name not in YARDSTICKS:
        return w.b_txt
    pairs = LOOP_MAX_PAIRS if name in ("reference", "scan-loop") else SORTED_MAX_PAIRS
    if w.backward:
        pairs = min(pairs, eager_max_bytes(device) // _saved_bytes_per_pair(w, name))
    k = min(w.b_txt, max(1, pairs // w.b_img))
    if name in ("sorted-eager", "sorted-compiled") and k < w.b_txt:
        k = max(CHUNK, k - k % CHUNK)  # whole chunks
    return min(k, w.b_txt)


def reference_captions(w: Workload) -> int:
    """How many of the workload's captions the reference is timed on (on the CPU)."""
    return timed_captions(w, "reference", "cpu")


def make_inputs(w: Workload, device: str, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    """Seeded inputs of a workload, drawn on ``device``: full-length regions, word lengths uniform in [m_min, m]."""
    g = torch.Generator(device=device).manual_seed(seed)
    regions = torch.randn(w.b_img, w.n, w.d, generator=g, device=device).to(dtype).requires_grad_(requires_grad)
    words = torch.randn(w.b_txt, w.m, w.d, generator=g, device=device).to(dtype).requires_grad_(requires_grad)
    region_lengths = torch.full((w.b_img,), w.n, device=device)
    word_lengths = torch.randint(min(w.m_min, w.m), w.m + 1, (w.b_txt,), generator=g, device=device)
    return regions, region_lengths, words, word_lengths


def valid_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The valid rows of a padded (B, L, d) batch, packed: (sum lengths, d)."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x.detach()[mask]


def scores_fn(name: str, direction: str, peers: Optional[dict] = None) -> Callable:
    """fn(regions, region_lengths, words, word_lengths) -> scores, of a backend or a peer."""
    opts = mefn_fast.make_options(direction=direction)
    if name in PEERS:
        peer = (peers or make_peers())[name]
        return lambda r, rl, t, tl: peer(r, rl, t, tl, opts)
    return lambda r, rl, t, tl: mefn_fast.xattn_similarity(r, rl, t, tl, direction=direction, backend=name)


def make_step(w: Workload, name: str, inputs, peers: Optional[dict] = None) -> Callable[[], object]:
    """A closure running one pass of a backend, a peer or a floor ("padded-floor", "packed-floor")."""
    regions, region_lengths, words, word_lengths = inputs
    if name == "padded-floor":
        return _product_step(regions.detach().reshape(-1, w.d), words.detach().reshape(-1, w.d), w.backward)
    if name == "packed-floor":
        return _product_step(valid_rows(regions, region_lengths), valid_rows(words, word_lengths), w.backward)
    fn = scores_fn(name, w.direction, peers)

    def forward():
        return fn(regions, region_lengths, words, word_lengths)
    if not w.backward:
        return forward
    g = torch.Generator(device=regions.device).manual_seed(1)
    grad = torch.randn(w.b_img, w.b_txt, generator=g, device=regions.device).to(regions.dtype)
    return lambda: torch.autograd.grad(forward(), (regions, words), grad)


def _product_step(a: torch.Tensor, b: torch.Tensor, backward: bool) -> Callable[[], object]:
    """a @ b.T with torch.matmul; with backward, that product and its two gradient products; a
    forward product beyond FLOOR_MAX_ELEMENTS runs in column chunks written into one reused buffer."""
    if backward:
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        grad = torch.ones(a.shape[0], b.shape[0], device=a.device, dtype=a.dtype)
        return lambda: torch.autograd.grad(torch.matmul(a, b.t()), (a, b), grad)
    cols = max(1, FLOOR_MAX_ELEMENTS // max(1, a.shape[0]))
    if cols >= b.shape[0]:
        return lambda: torch.matmul(a, b.t())
    buf = torch.empty(a.shape[0] * cols, device=a.device, dtype=a.dtype)

    def chunked():
        for j in range(0, b.shape[0], cols):
            bj = b[j:j + cols]
            torch.matmul(a, bj.t(), out=buf[:a.shape[0] * bj.shape[0]].view(a.shape[0], bj.shape[0]))
        return buf
    return chunked


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step, device: str) -> tuple:
    """(seconds, output) of one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = step()
    return time.perf_counter() - t0, out


def check_against_reference(w: Workload, name: str, device: str, dtype: torch.dtype,
                            peers: Optional[dict] = None) -> float:
    """Max |name - reference| on a small version of the workload: scores and gradients (a peer on a
    forward workload: scores only, so that the compiled peer compiles only what is timed).

    21 captions: two chunks for the sorted peers, so that their sorting is checked too.
    """
    small = replace(w, b_img=3, b_txt=21)
    grads = w.backward or name not in PEERS
    inputs = make_inputs(small, device, dtype, seed=3, requires_grad=grads)
    outs = []
    for who in (name, "reference"):
        r, rl, t, tl = inputs
        s = scores_fn(who, w.direction, peers)(r, rl, t, tl)
        outs.append([s, *(torch.autograd.grad(s.sum(), (r, t)) if grads else ())])
    return max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(*outs))


def peak_extra_memory(w: Workload, name: str, device: str, dtype_name: str) -> Optional[float]:
    """Peak extra memory (bytes) of one pass on the CPU, measured in a fresh subprocess (with this
    process's thread count)."""
    cmd = [sys.executable, "-m", "mefn_fast.bench", "--_memory", json.dumps(asdict(w)), name, device, dtype_name,
           str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
        return float(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _cuda_peak_extra(step) -> float:
    """Peak allocated bytes of one pass beyond what was allocated before it (its output included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return float(peak)


def _memory_child(spec: str, name: str, device: str, dtype_name: str, threads: str) -> None:
    torch.set_num_threads(int(threads))
    w = Workload(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec).items()})
    dtype = DTYPES[dtype_name]
    peers = make_peers()
    # One pass on a tiny version first: loading the extension, compiling kernels and starting the
    # thread pool are one-time costs, not the pass's memory. Sizes unlike each other (2 images, 3
    # captions), so that torch.compile's shape guards hold for the measured pass too.
    tiny = replace(w, b_img=2, b_txt=3)
    make_step(tiny, name, make_inputs(tiny, device, dtype, requires_grad=w.backward), peers)()
    step = make_step(w, name, make_inputs(w, device, dtype, requires_grad=w.backward), peers)
    # Reset the kernel's high-water mark (importing torch peaks above what it keeps), then compare
    # the peak resident set during the step with the resident set before it.
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
                if sys.stderr.isatty():
                    print(f"  {desc}: {s}", file=sys.stderr)

            def close(self):
                pass

        return _Plain()


def _why(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


class CompileBudget:
    """Seconds of ``torch.compile`` left for the compiled peer in this run (None: no limit)."""

    def __init__(self, seconds: Optional[float]):
        self.total = seconds
        self.spent = 0.0

    def allows(self) -> bool:
        return self.total is None or self.spent < self.total


def run_workload(w: Workload, device: str, dtype_name: str, backends: list, repeats: int, warmup: int = 1,
                 memory: bool = True, verify: bool = True, peers: Optional[list] = None,
                 compile_budget: Optional[CompileBudget] = None) -> list:
    """Time both floors, ``backends`` and ``peers`` (default: all) on one workload, interleaved;
    returns one row for each of them. A backend or peer that fails gets a row that says why."""
    dtype = DTYPES[dtype_name]
    peer_names = list(PEERS if peers is None else peers)
    peer_fns = make_peers()
    inputs = make_inputs(w, device, dtype, requires_grad=w.backward)
    names = [*FLOORS, *[b for b in backends if b not in FLOORS], *peer_names]
    sizes = {b: w for b in names}  # the workload each one is timed (and its memory measured) on
    scale = {b: 1.0 for b in names}
    notes = {b: [] for b in names}
    failed: dict = {}
    errors: dict = {b: None for b in names}
    compile_s: dict = {b: None for b in names}
    steps = {}
    regions, region_lengths, words, word_lengths = inputs
    for b in names:
        k = timed_captions(w, b, device)
        own = inputs
        if k < w.b_txt:
            sizes[b], scale[b] = replace(w, b_txt=k), w.b_txt / k
            own = (regions, region_lengths, words.detach()[:k].requires_grad_(w.backward), word_lengths[:k])
            notes[b].append(f"timed on {k} of {w.b_txt} captions, time x{scale[b]:.3g}; memory of that slice")
        steps[b] = make_step(sizes[b], b, own, peer_fns)
    if "sorted-compiled" in names and compile_budget is not None and not compile_budget.allows():
        failed["sorted-compiled"] = f"not run: the run's torch.compile budget ({compile_budget.total:g} s) is spent"
    for b in names:
        if b in FLOORS or b in failed:
            continue
        t0 = time.perf_counter()
        try:
            if verify and b != "reference":
                errors[b] = check_against_reference(w, b, device, dtype, peer_fns)
            if b == "sorted-compiled":  # compile for the full shapes too, outside the timing
                steps[b]()
                _sync(device)
        except Exception as e:  # one failing backend or peer must not lose the others
            failed[b] = ("torch.compile failed: " if b == "sorted-compiled" else "failed: ") + _why(e)
        if b == "sorted-compiled":
            compile_s[b] = time.perf_counter() - t0
            if compile_budget is not None:
                compile_budget.spent += compile_s[b]
            if b not in failed:
                notes[b].append(f"compilation and first full-size call {compile_s[b]:.0f} s, excluded from the timing")
        if errors[b] is not None and errors[b] > TOLERANCE[dtype_name]:
            notes[b].append(f"MISMATCH: differs from the reference by {errors[b]:.2e} "
                            f"(tolerance {TOLERANCE[dtype_name]:g})")
    live = [b for b in names if b not in failed]
    bar = _progress(len(live) * (warmup + repeats), f"{w.name} {dtype_name}")
    times = {b: [] for b in names}
    first_out: dict = {}
    deterministic = {b: (True if b in mefn_fast.backends.BACKENDS and b != "reference" else None) for b in names}
    for rep in range(warmup + repeats):
        for b in list(live):
            bar.set_postfix_str(f"{b} {rep + 1}/{warmup + repeats}")
            try:
                t, out = _time_once(steps[b], device)
            except Exception as e:
                failed[b] = "failed: " + _why(e)
                live.remove(b)
                continue
            if deterministic[b] is not None:  # bitwise the same output on every repeat?
                if b not in first_out:
                    first_out[b] = out
                elif deterministic[b] and not _same(first_out[b], out):
                    deterministic[b] = False
            del out
            if rep >= warmup:
                times[b].append(t * scale[b])
            bar.update()
    bar.close()
    first_out.clear()
    mem = {b: None for b in names}
    if memory:
        for b in live:
            mem[b] = (_cuda_peak_extra(steps[b]) if device == "cuda"
                      else peak_extra_memory(sizes[b], b, device, dtype_name))
    del steps
    med = {b: statistics.median(times[b]) for b in live}
    ref_med = med.get("reference")
    yard = {b: med[b] for b in YARDSTICKS if b in med}
    strongest = min(yard, key=yard.get) if yard else None
    rows = []
    for b in names:
        q1, m, q3 = _quartiles(times[b]) if b in med else (None, None, None)
        ratio = (lambda other: (other / m) if m and other else None)
        rows.append(dict(
            workload=w.name, device=device, dtype=dtype_name, pass_="fwd+bwd" if w.backward else "fwd", backend=b,
            b_img=w.b_img, b_txt=w.b_txt, n=w.n, m=w.m, d=w.d, direction=w.direction, repeats=len(times[b]),
            median_s=m, q1_s=q1, q3_s=q3,
            vs_padded_floor=(m / med["padded-floor"]) if m and "padded-floor" in med else None,  # >= 1: floors it costs
            vs_packed_floor=(m / med["packed-floor"]) if m and "packed-floor" in med else None,
            vs_reference=ratio(ref_med),  # > 1: faster than the reference
            vs_strongest_peer=ratio(yard.get(strongest)),  # > 1: faster than the fastest eager alternative
            strongest_peer=strongest,
            gflops=(w.flops() / m / 1e9) if m else None, peak_extra_bytes=mem[b],
            memory_vs_reference=(mem[b] / mem["reference"]) if mem.get("reference") and mem[b] is not None else None,
            max_abs_err_vs_reference=errors[b], deterministic=deterministic[b] if b in med else None,
            compile_s=compile_s[b],
            note="; ".join(notes[b] + ([failed[b]] if b in failed else []))))
    return rows


def plan_for(device: str, names: Optional[list] = None) -> list:
    """(workload, dtype name) pairs to run on ``device``: on a GPU in GPU_PLAN's order."""
    if device == "cuda":
        plan = list(GPU_PLAN)
    else:
        plan = [(n, dt) for n, w in WORKLOADS.items() if w.device in ("cpu", "both")
                for dt in w.dtypes if dt in ("fp32", "fp64")]
    return [(n, dt) for n, dt in plan if not names or n in names]


def run_plan(plan: list, device: str, requested_backends: Optional[list], repeats: int, memory: bool = True,
             peers: Optional[list] = None, budget_s: Optional[float] = None, compile_budget_s: Optional[float] = None,
             resize: Optional[Callable[[Workload], Workload]] = None, out_dir: Optional[str] = None,
             stem: str = "bench", env: Optional[dict] = None) -> tuple:
    """Run the (workload name, dtype) pairs of ``plan`` in order; returns (rows, skipped).

    Workloads not started within ``budget_s`` seconds are skipped (listed in ``skipped``). With
    ``out_dir`` the CSV, JSON and markdown are rewritten after every workload, so that a run cut
    short keeps what it measured.
    """
    rows, skipped = [], []
    start = time.time()
    budget = CompileBudget(compile_budget_s)
    for name, dtype_name in plan:
        w = WORKLOADS[name]
        if resize is not None:
            w = resize(w)
        if budget_s is not None and rows and time.time() - start > budget_s:  # the first always runs
            skipped.append(f"{name} {dtype_name} (the time budget of {budget_s:g} s was spent)")
            continue
        backends = backends_for(device, DTYPES[dtype_name], requested_backends, w)
        t0 = time.time()
        rows += run_workload(w, device, dtype_name, backends, repeats, memory=memory, peers=peers,
                             compile_budget=budget)
        print(f"{name} {dtype_name}: {', '.join(backends)} and {len(peers if peers is not None else PEERS)} peers "
              f"in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        if out_dir is not None:
            write_outputs(rows, env or environment(), out_dir, stem, skipped)
    if out_dir is not None and rows:
        write_outputs(rows, env or environment(), out_dir, stem, skipped)
    return rows, skipped


def environment() -> dict:
    """The machine, versions and commit that a run's rows belong to."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), commit=commit or "unknown", python=platform.python_version(),
                torch=torch.__version__, triton=triton_version, mefn_fast=mefn_fast.__version__,
                cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(), gpu=gpu,
                backends=mefn_fast.available_backends())


def backends_for(device: str, dtype: torch.dtype, requested: Optional[list], w: Optional[Workload] = None) -> list:
    """The available backends that take this device, dtype (and workload's shapes); the reference always."""
    n, m, d = (w.n, w.m, w.d) if w else (1, 1, 1)
    regions = torch.empty(1, n, d, device=device, dtype=dtype)
    words = torch.empty(1, m, d, device=device, dtype=dtype)
    opts = mefn_fast.make_options(direction=w.direction if w else "t2i")
    out = []
    for name, b in mefn_fast.backends.BACKENDS.items():
        if requested and name not in requested and name != "reference":
            continue
        if not b.reasons(regions, words, opts):
            out.append(name)
    return out


def _fmt_bytes(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**20:.0f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:.0f} KiB"


def _fmt_ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}" if s >= 1e-3 else f"{s * 1e3:.3f}"


def _fmt_speedup(r: Optional[float]) -> str:
    if r is None:
        return "-"
    if abs(r - 1) < 0.005:
        return "1.00x"
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def _fmt_x(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_table(rows: list, skipped: Optional[list] = None) -> str:
    """The rows as a markdown table; notes (slices, compilation, failures) as footnotes."""
    head = ("| workload | B_img x B_txt, N, M, d | dtype | pass | backend | median ms (q1-q3) | vs padded floor | "
            "vs packed floor | vs reference | vs strongest peer | GFLOP/s | peak extra mem | mem vs reference |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        star = " *" if r.get("note") else ""
        med = (f"{_fmt_ms(r['median_s'])} ({_fmt_ms(r['q1_s'])}-{_fmt_ms(r['q3_s'])})"
               if r["median_s"] is not None else "-")
        mem_ratio = r.get("memory_vs_reference")
        lines.append(
            f"| {r['workload']} | {r['b_img']} x {r['b_txt']}, {r['n']}, {r['m']}, {r['d']} | {r['dtype']} | "
            f"{r['pass_']} | {r['backend']}{star} | {med} | {_fmt_x(r['vs_padded_floor'])} | "
            f"{_fmt_x(r['vs_packed_floor'])} | {_fmt_speedup(r['vs_reference'])} | "
            f"{_fmt_speedup(r['vs_strongest_peer'])} | {'-' if r['gflops'] is None else format(r['gflops'], '.0f')} | "
            f"{_fmt_bytes(r['peak_extra_bytes'])} | {'-' if mem_ratio is None else format(mem_ratio, '.3f')} |")
    strongest = {}
    for r in rows:
        if r.get("strongest_peer"):
            strongest[(r["workload"], r["dtype"])] = r["strongest_peer"]
    if strongest:
        lines.append("\nStrongest peer (the fastest of the reference and the peers): "
                     + "; ".join(f"{wl} {dt}: {p}" for (wl, dt), p in strongest.items()))
    lines += [f"\n\\* {r['workload']} {r['dtype']} {r['backend']}: {r['note']}" for r in rows if r.get("note")]
    if skipped:
        lines.append("\nNot run: " + "; ".join(skipped))
    return "\n".join(lines)


def write_outputs(rows: list, env: dict, out_dir: str, stem: str, skipped: Optional[list] = None) -> list:
    """``stem``.csv (one line per row, with the environment), .json and .md in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "json", "md")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*env.keys(), *rows[0].keys()])
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: (",".join(v) if isinstance(v, list) else v) for k, v in env.items()}, **r})
    with open(paths[1], "w") as f:
        json.dump(dict(environment=env, rows=rows, skipped=skipped or []), f, indent=1)
    with open(paths[2], "w") as f:
        f.write(f"{env['date']}, commit {env['commit']}, torch {env['torch']}, {env['gpu'] or env['cpu']} "
                f"({env['cpu_threads']} threads); ratios from one interleaved run\n\n{format_table(rows, skipped)}\n")
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
    """Bar chart: each row's time as a multiple of the packed floor, per workload (log scale)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in rows if r["vs_packed_floor"] is not None]
    order = list(dict.fromkeys((r["workload"], r["dtype"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(order)), 4.2))
    width = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, g in enumerate(order):
            for r in rows:
                if (r["workload"], r["dtype"]) == g and r["backend"] == b:
                    xs.append(i + j * width)
                    ys.append(r["vs_packed_floor"])
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(order))], [f"{w}\n{d}" for w, d in order])
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("time / packed floor (log)")
    ax.set_title("backends, peers and floors vs the packed floor (lower is better)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SCALING_AXES = {"b_txt": [64, 128, 256, 512, 1024, 2048, 4096], "n": [36, 100, 197], "d": [256, 512, 1024]}


def run_scaling(device: str, dtype_name: str, backends: list, repeats: int, quick: bool, time_budget_s: float,
                base: Optional[Workload] = None, axes: Optional[dict] = None) -> list:
    """Vary B_txt, N and d one at a time around a base workload (floors and backends, no peers);
    skip a backend once a point exceeds the budget."""
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
            for r in run_workload(w, device, dtype_name, run_backends, repeats, memory=True, verify=False, peers=[]):
                r["axis"], r["value"] = axis, v
                rows.append(r)
                if r["backend"] not in FLOORS and (r["median_s"] or 0) > time_budget_s:
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
            pts = [(r["value"], r["median_s"], r["peak_extra_bytes"]) for r in rows
                   if r["axis"] == axis and r["backend"] == b and r["median_s"] is not None]
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
    p.add_argument("--peers", nargs="*", default=None, choices=list(PEERS),
                   help="peers to time (default: all; --peers alone: none)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help=f"reduced sizes ({QUICK_FACTOR}x images and captions), fewer repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); on a shared machine 1 keeps other jobs from stalling "
                        "the parallel regions of many small eager operations")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no workload after this many seconds (the rest are listed as not run)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="seconds of torch.compile for the compiled peer; once spent, later workloads leave it out")
    p.add_argument("--scaling", action="store_true", help="also run the scaling study (B_txt, N, d)")
    p.add_argument("--scaling-only", action="store_true", help="run only the scaling study")
    p.add_argument("--no-memory", action="store_true", help="skip the per-backend memory measurements")
    p.add_argument("--out", default="bench-results", help="folder for the CSV, JSON, markdown table and PNG plots")


def run(args: argparse.Namespace, resize: Optional[Callable[[Workload], Workload]] = None,
        plan: Optional[list] = None) -> int:
    """Run the benchmark described by parsed ``args``; returns an exit code.

    ``resize`` maps each workload to the size actually run (``--quick`` is one such map); ``plan``
    replaces the device's (workload, dtype) list.
    """
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1 or (args.threads is not None and args.threads < 1):
        print("error: --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick and resize is None:
        resize = lambda w: w.scaled(QUICK_FACTOR)  # noqa: E731
    env = environment()
    print(f"mefn_fast bench on {env['gpu'] or env['cpu']} ({device}, {env['cpu_threads']} threads), "
          f"torch {env['torch']}, commit {env['commit']}")
    if not args.scaling_only:
        plan = plan if plan is not None else plan_for(device, args.workloads)
        for name in args.workloads or []:
            if not any(n == name for n, _ in plan):
                print(f"skipping {name}: it is a {WORKLOADS[name].device} workload")
        rows, skipped = run_plan(plan, device, args.backends, repeats, memory=not args.no_memory, peers=args.peers,
                                 budget_s=args.budget_s, compile_budget_s=args.compile_budget_s, resize=resize,
                                 out_dir=args.out, stem=f"bench-{device}", env=env)
        if rows:
            print()
            print(format_table(rows, skipped))
            paths = [os.path.join(args.out, f"bench-{device}.{ext}") for ext in ("csv", "json", "md")]
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
        _memory_child(*argv[1:6])
        return 0
    p = argparse.ArgumentParser(prog="python -m mefn_fast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
