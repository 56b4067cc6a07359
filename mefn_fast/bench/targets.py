"""The GPU performance targets, and their verdicts on a run's rows and GPU test results.

Each target is read off the rows of :mod:`mefn_fast.bench.runner` (ratios measured in one
interleaved run) for each GPU backend, and says *met*, *not met* or *not measured* (with why).
Determinism is read off both the benchmark (each fused backend's repeats compared bitwise) and
the GPU tests whose name says "determinism".

Standard library only: ``benchmarks/gpu_check.py`` loads this file by its path, before the
package is built and whether or not it imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GPU_BACKENDS = ("cuda", "triton")
GIB = 2 ** 30
# eval-coco5k-gpu in bounded memory: its bf16 scores take 0.25 GB and its padded tile would take
# 288 GB; a blocked backend needs the scores and a few tiles in flight.
BOUNDED_MEMORY_BYTES = 4 * GIB


@dataclass(frozen=True)
class Target:
    """A ratio (a row's ``metric``) at most ``limit`` on one workload and dtype, per GPU backend."""

    text: str
    workload: str
    dtype: str
    metric: str
    limit: float
    max_extra_bytes: Optional[float] = None


TARGETS = (
    Target("eval-f30k-gpu fp16 forward: at most 1.5x the packed floor", "eval-f30k-gpu", "fp16", "vs_packed_floor", 1.5),
    Target("eval-coco5k-gpu bf16 forward: at most 1.5x the packed floor, in bounded memory (at most 4 GiB extra)",
           "eval-coco5k-gpu", "bf16", "vs_packed_floor", 1.5, BOUNDED_MEMORY_BYTES),
    Target("train-gpu bf16 forward+backward: at most 2x the packed floor", "train-gpu", "bf16", "vs_packed_floor", 2.0),
    Target("train-gpu bf16: peak extra memory at most 1/10 of the reference's", "train-gpu", "bf16",
           "memory_vs_reference", 0.1),
)
DETERMINISM = "determinism: bitwise identical results from run to run (benchmark repeats and GPU tests)"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _target_verdict(t: Target, rows: list, backend: str, gpu: bool) -> dict:
    def out(verdict: str, measured: str = "-", why: str = "") -> dict:
        return dict(target=t.text, backend=backend, verdict=verdict, measured=measured, why=why)
    if not gpu:
        return out("not measured", why="no GPU")
    row = next((r for r in rows if r["workload"] == t.workload and r["dtype"] == t.dtype and r["backend"] == backend
                and r.get("device") == "cuda"), None)
    if row is None:
        ran = any(r["workload"] == t.workload and r["dtype"] == t.dtype for r in rows)
        return out("not measured", why=f"{backend} is unavailable for this workload" if ran
                   else "the workload was not run (see the benchmark stage)")
    if row.get("median_s") is None:
        return out("not measured", why=row.get("note") or "no timing")
    value = row.get(t.metric)
    if value is None:
        return out("not measured", why=f"no {t.metric.replace('_', ' ')}: {row.get('note') or 'not measured'}")
    unit = "the reference's memory" if t.metric == "memory_vs_reference" else "the packed floor"
    measured = f"{value:.2f}x {unit}"
    if t.metric == "vs_packed_floor" and row.get("vs_padded_floor") is not None:
        measured += f" ({row['vs_padded_floor']:.2f}x padded)"
    ok = value <= t.limit
    if t.max_extra_bytes is not None:
        extra = row.get("peak_extra_bytes")
        measured += f"; peak extra {_gib(extra)}" if extra is not None else "; peak extra memory not measured"
        ok = ok and extra is not None and extra <= t.max_extra_bytes
        if extra is None:
            return out("not measured", measured, "no memory measurement")
    if "MISMATCH" in (row.get("note") or ""):
        return out("not met", measured, "its results differ from the reference")
    return out("met" if ok else "not met", measured)


def _determinism_verdict(rows: list, tests: list, backend: str, gpu: bool) -> dict:
    flags = [r["deterministic"] for r in rows
             if r["backend"] == backend and r.get("device") == "cuda" and r.get("deterministic") is not None]
    outcomes = [t["outcome"] for t in tests
                if "determinis" in t["name"] and t.get("file", "").endswith(f"test_xattn_similarity_{backend}.py")
                and t["outcome"] in ("passed", "failed", "error")]
    measured = []
    if flags:
        measured.append(f"{sum(flags)} of {len(flags)} benchmark rows identical over their repeats")
    if outcomes:
        measured.append(f"{outcomes.count('passed')} of {len(outcomes)} determinism tests passed")
    verdict = dict(target=DETERMINISM, backend=backend, measured="; ".join(measured) or "-", why="")
    if not gpu:
        return dict(verdict, verdict="not measured", why="no GPU")
    if not flags and not outcomes:
        return dict(verdict, verdict="not measured", why="no GPU row or determinism test of this backend ran")
    return dict(verdict, verdict="met" if all(flags) and all(o == "passed" for o in outcomes) else "not met")


def evaluate(rows: list, tests: Optional[list] = None, gpu: bool = True) -> list:
    """One verdict per target and GPU backend: dicts with target, backend, verdict, measured, why.

    ``tests``: dicts with name, file and outcome ("passed", "failed", "error", "skipped").
    """
    out = [_target_verdict(t, rows, b, gpu) for t in TARGETS for b in GPU_BACKENDS]
    out += [_determinism_verdict(rows, tests or [], b, gpu) for b in GPU_BACKENDS]
    return out


def format_verdicts(verdicts: list) -> str:
    """The verdicts as a markdown table."""
    lines = ["| target | backend | measured | verdict |", "|---|---|---|---|"]
    for v in verdicts:
        verdict = v["verdict"] if v["verdict"] == "not measured" else f"**{v['verdict']}**"
        if v["why"]:
            verdict += f" ({v['why']})"
        lines.append(f"| {v['target']} | {v['backend']} | {v['measured']} | {verdict} |")
    return "\n".join(lines)
