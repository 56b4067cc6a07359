"""The benchmark runner (mefn_fast.bench) on tiny workloads: rows, ratios, memory, outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from mefn_fast.bench import runner as bench


TINY = bench.Workload("tiny", 3, 7, 5, 4, 16, False, ("fp32",), "cpu", m_min=2)


def test_workloads_are_spec_section_6():
    w = bench.WORKLOADS
    assert (w["eval-f30k-cpu"].b_img, w["eval-f30k-cpu"].b_txt, w["eval-f30k-cpu"].d) == (128, 640, 1024)
    assert w["train-cpu"].backward and w["train-cpu"].direction == "both"
    assert (w["vit-patches"].n, w["vit-patches"].d) == (197, 512)
    assert w["eval-coco5k-gpu"].dtypes == ("bf16",)
    r, rl, t, tl = bench.make_inputs(w["train-cpu"].scaled(0.05), "cpu", torch.float32)
    assert int(tl.min()) >= 8 and int(tl.max()) <= 32 and torch.equal(rl, torch.full_like(rl, 36))


@pytest.mark.parametrize("backward", [False, True])
def test_run_workload_rows(backward):
    from dataclasses import replace

    w = replace(TINY, backward=backward)
    backends = bench.backends_for("cpu", torch.float32, None)
    rows = bench.run_workload(w, "cpu", "fp32", backends, repeats=2, memory=backward)  # a subprocess per backend: once
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"floor", *backends} and "reference" in by
    assert by["floor"]["vs_floor"] == 1.0 and by["reference"]["vs_reference"] == 1.0
    for r in rows:
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["vs_floor"] == pytest.approx(r["median_s"] / by["floor"]["median_s"])
        if backward:
            assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
        if r["backend"] not in ("floor", "reference"):
            assert r["max_abs_err_vs_reference"] <= 1e-4


def test_outputs_and_plots(tmp_path):
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False)
    env = bench.environment()
    csv_path, json_path, md_path = bench.write_outputs(rows, env, str(tmp_path), "t")
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    data = json.load(open(json_path))
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 2
    assert "| tiny | 3 x 7, 5, 4, 16 | fp32 | fwd | reference |" in open(md_path).read()
    png = bench.plot_rows(rows, str(tmp_path / "b.png"))
    assert png and (tmp_path / "b.png").stat().st_size > 1000


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
    out = bench.make_step(TINY, "floor", (r, rl, t, tl))()
    assert calls == [8, 8, 8, 4]
    torch.testing.assert_close(out[:a.shape[0] * 4].view(a.shape[0], 4), real(a, b[24:].t()))


def test_reference_on_a_slice_when_too_large(monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(bench, "REFERENCE_MAX_PAIRS", 6)  # 3 images: 2 of the 7 captions
    assert bench.reference_captions(TINY) == 2
    rows = bench.run_workload(TINY, "cpu", "fp32", ["reference"], repeats=1, memory=False)
    ref = next(r for r in rows if r["backend"] == "reference")
    assert ref["note"] == "timed on 2 of 7 captions, time x3.5; memory of that slice"
    assert "reference *" in bench.format_table(rows) and "\\* tiny fp32 reference: timed on 2" in bench.format_table(rows)
    monkeypatch.setattr(bench, "REFERENCE_MAX_PAIRS", 10 ** 6)
    monkeypatch.setattr(bench, "REFERENCE_MAX_BYTES", 16 * TINY.m * (TINY.n + TINY.d) * 4 * 9)  # backward: 9 pairs
    assert bench.reference_captions(TINY) == 7 and bench.reference_captions(replace(TINY, backward=True)) == 3
