"""benchmarks/gpu_check.sh: its dry run here (the same seven stages, "no GPU"), the files it leaves
and the shape of its summary; and the driver's parts (time limits, stopped commands, failed stages)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAMES = ["environment", "build", "CUDA GPU tests", "Triton GPU tests", "benchmarks", "compute-sanitizer",
               "summary"]
FILES = ["bench.log", "results.csv", "results.json", "setup.log", "summary.md", "tests.log", "tests.xml"]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check_driver", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gc = _driver()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.time()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return out, proc, time.time() - t0


def test_dry_run_leaves_seven_flat_files(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == FILES == sorted(gc.OUTPUTS)
    assert all(os.path.isfile(out / f) for f in FILES) and len(FILES) <= 8  # what the device tool brings back


def test_dry_run_stages_in_order_within_the_budget(dry_run):
    out, _, wall = dry_run
    data = json.loads((out / "results.json").read_text())
    stages = data["stages"]
    assert [(s["number"], s["name"]) for s in stages] == list(enumerate(STAGE_NAMES, start=1))
    want = {1: "ok", 2: "skipped", 3: "no GPU", 4: "no GPU", 5: "no GPU", 6: "no GPU", 7: "ok"}
    assert {s["number"]: s["status"] for s in stages} == want
    for s in stages:
        assert s["seconds"] <= s["limit_s"] + 3, s
    assert data["check"]["dry_run"] and data["check"]["elapsed_s"] <= data["check"]["budget_s"] and wall < 420


def test_dry_run_summary_has_every_section_and_verdict(dry_run):
    out, proc, _ = dry_run
    text = (out / "summary.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Stages", "## Targets", "## Benchmarks", "## Failed tests", "## compute-sanitizer", "## Files"]
    stage_rows = [line for line in text.split("## Stages")[1].split("## Targets")[0].splitlines()
                  if line.startswith("| ") and not line.startswith("| #")]
    assert [row.split(" | ")[1] for row in stage_rows] == STAGE_NAMES
    verdicts = [line for line in text.split("## Targets")[1].split("## Benchmarks")[0].splitlines()
                if line.startswith("| ") and not line.startswith("| target")]
    targets = gc._load_targets()
    assert len(verdicts) == (len(targets.TARGETS) + 1) * len(targets.GPU_BACKENDS)
    assert all(v.endswith("| not measured (no GPU) |") for v in verdicts)
    for wl, dt in (("eval-f30k-gpu", "fp16"), ("eval-coco5k-gpu", "bf16"), ("train-gpu", "bf16"), ("vit-patches", "bf16")):
        assert f"| {wl} | {dt} |" in text.split("## Benchmarks")[1]
    assert proc.stdout.rstrip().endswith(text.split("## Targets")[1].split("## Benchmarks")[0].rstrip())  # printed last


def test_dry_run_rows_and_tests(dry_run):
    out, _, _ = dry_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["backend"] for r in rows} >= {"padded-floor", "packed-floor", "reference", "scan-loop", "sorted-eager"}
    assert [r["workload"] for r in rows][0] == "eval-f30k-gpu" and "vs_strongest_peer" in rows[0]
    suites = ET.parse(out / "tests.xml").getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["CUDA GPU tests", "Triton GPU tests", "compute-sanitizer"]
    cases = suites[0].findall("testcase") + suites[1].findall("testcase")
    assert cases and all(c.find("skipped") is not None for c in cases)  # every GPU test: "no GPU"
    assert len(suites[2].findall("testcase")) == len(gc.SANITIZER_CASES)


def test_a_failing_interpreter_fails_every_stage_but_the_summary(tmp_path):
    """No torch (here: an interpreter that always fails): each stage is recorded and the next still
    runs; after the failed builds the package runs from the tree, its kernels/ linked in."""
    tree, out = tmp_path / "tree", tmp_path / "out"
    (tree / "mefn_fast").mkdir(parents=True)
    (tree / "kernels").mkdir()
    check = gc.run_check(gc.Check(out=str(out), python="/bin/false", dry_run=False, budget_s=120, repo=str(tree)))
    assert [s.name for s in check.stages] == STAGE_NAMES
    assert [s.status for s in check.stages[:5]] == ["failed"] * 5 and check.stages[-1].status == "ok"
    assert "pip install failed (exit 1)" in check.stages[1].detail and "in-place build failed" in check.stages[1].detail
    assert os.readlink(tree / "mefn_fast" / "kernels") == os.path.join("..", "kernels")
    assert check.extra_env["PYTHONPATH"].startswith(str(tree))
    assert sorted(os.listdir(out)) == FILES
    assert "not measured" in (out / "summary.md").read_text()


def test_a_command_past_its_limit_is_stopped(tmp_path):
    log = tmp_path / "log"
    t0 = time.time()
    rc, timed_out, secs = gc.run_cmd([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                     2.0, str(log))
    assert timed_out and rc != 0 and time.time() - t0 < 6
    assert "started" in log.read_text() and "stopped at its limit of 2 s" in log.read_text()
    assert gc.run_cmd(["true"], 5.0, str(log))[:2] == (0, False)


def test_stage_limits_keep_the_later_stages_their_share():
    check = gc.Check(out="unused", python="python3", dry_run=True, budget_s=420)
    assert gc.stage_limit(check, 1) == 20
    check.start -= 420 - 225  # 225 s left when the benchmarks start: what stages 6-7 leave them
    assert gc.stage_limit(check, 5) == pytest.approx(225 - 55, abs=1)
    check.start -= 200  # 25 s left: stage 2 would squeeze the stages after it
    assert gc.stage_limit(check, 2) == 0 and gc.stage_limit(check, 6) == pytest.approx(20, abs=1)


def test_outcomes_are_read_from_a_stopped_pytest_log():
    text = ("tests/test_xattn_similarity_triton.py::test_gpu_half_precision[x-torch.bfloat16] PASSED [ 10%]\n"
            "tests/test_xattn_similarity_triton.py::test_gpu_run_to_run_determinism[torch.float32] FAILED [ 20%]\n"
            "some other line\n")
    got = gc.parse_pytest_log(text, "tests/test_xattn_similarity_triton.py")
    assert [(t["name"], t["outcome"]) for t in got] == [("test_gpu_half_precision[x-torch.bfloat16]", "passed"),
                                                        ("test_gpu_run_to_run_determinism[torch.float32]", "failed")]
    targets = gc._load_targets()
    det = [v for v in targets.evaluate([], got, gpu=True) if v["backend"] == "triton" and "determinism" in v["target"]]
    assert det[0]["verdict"] == "not met" and "0 of 1 determinism tests passed" in det[0]["measured"]
