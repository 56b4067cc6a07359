"""The benchmark runner (mefn_fast.bench) on tiny workloads: floors, peers, rows, ratios, memory, outputs."""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from conftest import OPTION_GRID, make_inputs, option_id, ref_scores
from mefn_fast.bench import peers as bench_peers
from mefn_fast.bench import runner as bench
from mefn_fast.options import make_options

TINY = bench.Workload("tiny", 3, 7, 5, 4, 16, False, ("fp32",), "cpu", m_min=2)
EAGER_PEERS = ["scan-loop", "sorted-eager"]  # the compiled peer has its own (slower) tests


def test_workloads_are_the_named_ones():
    w = bench.WORKLOADS
    assert (w["eval-f30k-cpu"].b_img, w["eval-f30k-cpu"].b_txt, w["eval-f30k-cpu"].d) == (128, 640, 1024)
    assert w["train-cpu"].backward and w["train-cpu"].direction == "both"
    assert (w["vit-patches"].n, w["vit-patches"].d) == (197, 512)
    assert w["eval-coco5k-gpu"].dtypes == ("bf16",)
    r, rl, t, tl = bench.make_inputs(w["train-cpu"].scaled(0.05), "cpu", torch.float32)
    assert int(tl.min()) >= 8 and int(tl.max()) <= 32 and torch.equal(rl, torch.full_like(rl, 36))
    assert bench.plan_for("cuda")[:4] == [("eval-f30k-gpu", "fp16"), ("eval-coco5k-gpu", "bf16"),
                                          ("train-gpu", "bf16"), ("vit-patches", "bf16")]
    assert bench.plan_for("cpu") == [("eval-f30k-cpu", "fp32"), ("train-cpu", "fp32"), ("vit-patches", "fp32")]


@pytest.mark.parametrize("backward", [False, True])
def test_run_workload_rows(backward):
    w = replace(TINY, backward=backward)
    backends = bench.backends_for("cpu", torch.float32, None, w)
    rows = bench.run_workload(w, "cpu", "fp32", backends, repeats=2, memory=backward, peers=EAGER_PEERS)
    by = {r["backend"]: r for r in rows}
    assert list(by) == [*bench.FLOORS, *backends, *EAGER_PEERS] and "reference" in by
    assert by["padded-floor"]["vs_padded_floor"] == 1.0 and by["packed-floor"]["vs_packed_floor"] == 1.0
    assert by["reference"]["vs_reference"] == 1.0
    yard = {b: by[b]["median_s"] for b in ("reference", *EAGER_PEERS)}
    strongest = min(yard, key=yard.get)
    for r in rows:
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["vs_padded_floor"] == pytest.approx(r["median_s"] / by["padded-floor"]["median_s"])
        assert r["vs_packed_floor"] == pytest.approx(r["median_s"] / by["packed-floor"]["median_s"])
        assert r["strongest_peer"] == strongest
        assert r["vs_strongest_peer"] == pytest.approx(yard[strongest] / r["median_s"])
        if backward:
            assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
        if r["backend"] not in (*bench.FLOORS, "reference"):
            assert r["max_abs_err_vs_reference"] <= 1e-4 and "MISMATCH" not in r["note"]
    assert by[strongest]["vs_strongest_peer"] == 1.0
    if "cpu" in by:  # the fused op's repeats are compared bitwise; floors and peers are not
        assert by["cpu"]["deterministic"] is True
    assert by["padded-floor"]["deterministic"] is None and by["sorted-eager"]["deterministic"] is None


@pytest.mark.parametrize("backward", [False, True])
def test_packed_floor_is_the_product_of_the_valid_rows(monkeypatch, backward):
    w = replace(TINY, backward=backward)
    r, _, t, _ = bench.make_inputs(w, "cpu", torch.float32)
    rl, tl = torch.tensor([5, 2, 3]), torch.tensor([4, 1, 2, 4, 3, 1, 2])  # ragged regions too
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda x, y, **kw: calls.append((tuple(x.shape), tuple(y.shape))) or real(x, y, **kw))
    out = bench.make_step(w, "packed-floor", (r, rl, t, tl))()
    a = torch.cat([r[i, :n] for i, n in enumerate(rl.tolist())])  # 10 x 16
    b = torch.cat([t[j, :n] for j, n in enumerate(tl.tolist())])  # 17 x 16
    assert calls == [((10, 16), (16, 17))]
    if backward:  # the product and its two gradients: ones @ b and ones.T @ a
        ones = torch.ones(10, 17)
        torch.testing.assert_close(out[0], real(ones, b))
        torch.testing.assert_close(out[1], real(ones.t(), a))
    else:
        torch.testing.assert_close(out, real(a, b.t()))
    calls.clear()
    bench.make_step(w, "padded-floor", (r, rl, t, tl))()
    assert calls[0] == ((15, 16), (16, 28))


@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_peers_equal_the_reference_in_fp64(opts):
    """Ragged regions and words, 37 captions (three chunks of the sorted peers, in shuffled lengths)."""
    r, rl, t, tl = make_inputs(3, 37, 7, 5, 11, seed=5)
    want = ref_scores(r, rl, t, tl, **opts)
    o = make_options(**opts)
    for name, fn in bench_peers.make_peers().items():
        if name == "sorted-compiled":
            continue
        got = fn(r, rl, t, tl, o)
        assert got.dtype == torch.float64 and got.shape == (3, 37)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-10, name


@pytest.mark.parametrize("opts", [OPTION_GRID[i] for i in (0, 11, 16, 23)], ids=option_id)
def test_peer_gradients_equal_the_reference(opts):
    r, rl, t, tl = make_inputs(3, 20, 6, 5, 9, seed=6, requires_grad=True)
    weight = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.autograd.grad((ref_scores(r, rl, t, tl, **opts) * weight).sum(), (r, t))
    for name in EAGER_PEERS:
        got = torch.autograd.grad((bench_peers.make_peers()[name](r, rl, t, tl, make_options(**opts)) * weight).sum(), (r, t))
        for g, h in zip(got, want):
            assert float((g - h).abs().max() / h.abs().max()) <= 1e-10, name


def test_peers_keep_padding_inert():
    r, rl, t, tl = make_inputs(2, 5, 6, 5, 8, seed=7)
    r2, t2 = r.clone(), t.clone()
    r2[1, int(rl[1]):] = 1e3
    t2[1, int(tl[1]):] = -7.0
    o = make_options(direction="both")
    for name in EAGER_PEERS:
        fn = bench_peers.make_peers()[name]
        torch.testing.assert_close(fn(r2, rl, t2, tl, o), fn(r, rl, t, tl, o), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_compiled_peer_equals_the_reference():
    """torch.compile of the sorted peer's chunk function (about a minute on a 2-core CPU)."""
    r, rl, t, tl = make_inputs(3, 21, 6, 5, 16, seed=8, dtype=torch.float32, requires_grad=True)
    o = make_options(direction="both")
    got = bench_peers.SortedChunks(compile=True)(r, rl, t, tl, o)
    want = ref_scores(r, rl, t, tl, direction="both")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for g, h in zip(torch.autograd.grad(got.sum(), (r, t)), torch.autograd.grad(want.sum(), (r, t))):
        torch.testing.assert_close(g, h, rtol=0, atol=1e-5)


def test_a_failing_compile_is_a_row_that_says_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False, peers=["sorted-compiled"])
    row = rows[-1]
    assert row["backend"] == "sorted-compiled" and row["median_s"] is None and row["vs_packed_floor"] is None
    assert row["note"].endswith("torch.compile failed: RuntimeError: no C++ compiler")
    assert "| sorted-compiled * | - |" in bench.format_table(rows)


def test_compile_budget_leaves_the_compiled_peer_out(monkeypatch):
    budget = bench.CompileBudget(5.0)
    budget.spent = 6.0
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False, peers=["sorted-compiled"],
                              compile_budget=budget)
    assert rows[-1]["median_s"] is None and "torch.compile budget (5 s) is spent" in rows[-1]["note"]


def test_a_wrong_peer_is_flagged(monkeypatch):
    real = bench_peers.make_peers

    def wrong():
        peers = real()
        peers["sorted-eager"] = lambda r, rl, t, tl, o: bench_peers.scan_loop(r, rl, t, tl, o) + 0.5
        return peers
    monkeypatch.setattr(bench, "make_peers", wrong)
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False, peers=["sorted-eager"])
    assert "MISMATCH: differs from the reference by 5.00e-01" in rows[-1]["note"]


def test_outputs_and_plots(tmp_path):
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False, peers=EAGER_PEERS)
    env = bench.environment()
    csv_path, json_path, md_path = bench.write_outputs(rows, env, str(tmp_path), "t", ["x fp32 (not run)"])
    with open(csv_path) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows)
    for column in ("vs_padded_floor", "vs_packed_floor", "vs_reference", "vs_strongest_peer", "strongest_peer",
                   "deterministic", "compile_s"):
        assert column in lines[0]
    data = json.load(open(json_path))
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 5
    assert data["skipped"] == ["x fp32 (not run)"]
    md = open(md_path).read()
    assert "| vs padded floor | vs packed floor | vs reference | vs strongest peer |" in md
    assert "| tiny | 3 x 7, 5, 4, 16 | fp32 | fwd | packed-floor |" in md and "Not run: x fp32 (not run)" in md
    png = bench.plot_rows(rows, str(tmp_path / "b.png"))
    assert png and (tmp_path / "b.png").stat().st_size > 1000


def test_run_plan_keeps_to_its_budget(tmp_path):
    tiny = lambda w: replace(w, b_img=2, b_txt=3, d=8)  # noqa: E731
    rows, skipped = bench.run_plan([("train-cpu", "fp32"), ("eval-f30k-cpu", "fp32")], "cpu", ["reference"], 1,
                                   memory=False, peers=[], budget_s=0.0, resize=tiny, out_dir=str(tmp_path), stem="p")
    assert {r["workload"] for r in rows} == {"train-cpu"}
    assert skipped == ["eval-f30k-cpu fp32 (the time budget of 0 s was spent)"]
    assert json.load(open(tmp_path / "p.json"))["skipped"] == skipped


def test_scaling_study(tmp_path):
    rows = bench.run_scaling("cpu", "fp32", ["reference"], repeats=1, quick=False, time_budget_s=60,
                             base=TINY, axes={"b_txt": [4, 8], "d": [8, 16]})
    assert [(r["axis"], r["value"]) for r in rows if r["backend"] == "reference"] == [("b_txt", 4), ("b_txt", 8), ("d", 8), ("d", 16)]
    assert bench.plot_scaling(rows, str(tmp_path / "s.png"))


def test_cli_rejects_unknown_workload():
    with pytest.raises(SystemExit):
        bench.main(["--workloads", "no-such-workload"])


def test_large_floor_runs_in_column_chunks(monkeypatch):
    """A product too large to hold is the same FLOPs in column chunks into one buffer."""
    r, rl, t, tl = bench.make_inputs(TINY, "cpu", torch.float32)
    a, b = r.reshape(-1, TINY.d), t.reshape(-1, TINY.d)  # 15 x 16 and 28 x 16
    monkeypatch.setattr(bench, "FLOOR_MAX_ELEMENTS", a.shape[0] * 8)  # 8 columns per chunk: 8+8+8+4
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda x, y, **kw: calls.append(y.shape[1]) or real(x, y, **kw))
    out = bench.make_step(TINY, "padded-floor", (r, rl, t, tl))()
    assert calls == [8, 8, 8, 4]
    torch.testing.assert_close(out[:a.shape[0] * 4].view(a.shape[0], 4), real(a, b[24:].t()))


def test_eager_loops_on_a_slice_when_too_large(monkeypatch):
    monkeypatch.setattr(bench, "LOOP_MAX_PAIRS", 6)  # 3 images: 2 of the 7 captions
    assert bench.reference_captions(TINY) == 2 and bench.timed_captions(TINY, "scan-loop") == 2
    assert bench.timed_captions(TINY, "cpu") == 7 and bench.timed_captions(TINY, "packed-floor") == 7
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False, peers=["scan-loop"])
    for r in rows[-2:]:
        assert r["note"] == "timed on 2 of 7 captions, time x3.5; memory of that slice"
    table = bench.format_table(rows)
    assert "reference *" in table and "\\* tiny fp32 reference: timed on 2" in table
    monkeypatch.setattr(bench, "LOOP_MAX_PAIRS", 10 ** 6)
    monkeypatch.setattr(bench, "EAGER_MAX_BYTES", 16 * TINY.m * (TINY.n + TINY.d) * 4 * 9)  # backward: 9 pairs
    assert bench.reference_captions(TINY) == 7 and bench.reference_captions(replace(TINY, backward=True)) == 3


def test_sorted_peers_are_sliced_in_whole_chunks(monkeypatch):
    w = replace(TINY, b_img=10, b_txt=100)
    monkeypatch.setattr(bench, "SORTED_MAX_PAIRS", 10 * 40)
    assert bench.timed_captions(w, "sorted-eager") == 32 and bench.timed_captions(w, "sorted-compiled") == 32
    monkeypatch.setattr(bench, "SORTED_MAX_PAIRS", 10 * 5)
    assert bench.timed_captions(w, "sorted-eager") == bench_peers.CHUNK


def test_threads_flag(tmp_path):
    before = torch.get_num_threads()
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    try:
        assert bench.run(p.parse_args(["--threads", "0"])) == 2
        assert bench.run(p.parse_args(["--threads", "1", "--out", str(tmp_path)]), plan=[]) == 0
        assert torch.get_num_threads() == 1
        assert bench.peak_extra_memory(TINY, "reference", "cpu", "fp32") is not None  # the child takes the count too
    finally:
        torch.set_num_threads(before)
