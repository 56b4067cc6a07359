"""``mefn-fast ablation`` on a tiny budget: a table with every row, mean +- std, JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mefn_fast.retrieval.ablation import VARIANTS, variant_key
from mefn_fast.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ablation_command_tiny_budget(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablation", "--out", str(out), "--seeds", "0", "1", "--synth-train", "12", "--synth-test", "6",
                 "--epochs", "1", "--batch-size", "10", "--max-steps", "2", "--embed-dim", "16", "--text-hidden",
                 "16", "--text-layers", "1", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | i2t R@1 | i2t R@5 | i2t mAP | t2i R@1 | t2i R@5 | t2i mAP")
    assert len(table) == 1 + len(VARIANTS)
    for (name, _), line in zip(VARIANTS, table[1:]):
        assert line.startswith(f"| {name}") and line.count("±") == 7
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [n for n, _ in VARIANTS] and result["seeds"] == [0, 1]
    for r in rows.values():
        per_seed = [r["per_seed"][s]["metrics"] for s in ("0", "1")]
        assert all(p["steps"] == 2 for p in r["per_seed"].values())
        for k, stat in r["summary"].items():
            vals = [m[k] for m in per_seed]
            assert stat["mean"] == pytest.approx(np.mean(vals)) and stat["std"] == pytest.approx(np.std(vals, ddof=1))
    # VSE++ is use_local=False (docs/math.md), the "w/o local attention" model: trained once, reported twice
    assert rows["VSE++ (global only)"]["same_as"] == "w/o local attention"
    assert rows["VSE++ (global only)"]["summary"] == rows["w/o local attention"]["summary"]
    assert "(= w/o local attention)" in printed
    assert len({r["key"] for r in rows.values()}) == 5
    assert (out / "ablation.md").read_text().count("\n| ") == len(VARIANTS) + 1


def test_variant_keys_and_bad_variant(tmp_path):
    assert variant_key(dict(mfe=True, use_local=False, use_global=True)) == \
        variant_key(dict(mfe=False, use_local=False, use_global=True))
    assert variant_key(dict(mfe=False, use_local=True, use_global=False)) == "local"
    with pytest.raises(SystemExit):
        main(["ablation", "--out", str(tmp_path), "--variants", "nope"])
