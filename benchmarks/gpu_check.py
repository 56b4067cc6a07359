"""The one-shot GPU check: every verdict and number of a lent GPU machine, from one call.

    OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/x   # the same stages on a CPU machine ("no GPU")

Seven stages run in order, each under its own time limit; a stage that fails or runs out of time
is recorded and the next one still runs:

1. environment: GPU, driver, torch, Triton, nvcc, compute-sanitizer, pytest;
2. build: ``pip install --no-build-isolation --no-deps --no-index -e .`` with ``MAX_JOBS`` = the
   cores, for the GPU's architecture; if it fails or times out, ``python setup.py build_ext
   --inplace`` in the time left (the package then runs from the tree);
3. the CUDA GPU tests, 4. the Triton GPU tests: ``pytest -m "gpu and not slow" --timeout`` on
   ``tests/test_xattn_similarity_cuda.py`` and ``tests/test_xattn_similarity_triton.py``;
5. the benchmarks (``benchmarks/bench_xattn_similarity_gpu.py``): eval-f30k-gpu fp16,
   eval-coco5k-gpu bf16, train-gpu bf16, vit-patches, then fp32, each beside both cuBLAS floors,
   the reference and the peers, until the stage's time is spent;
6. compute-sanitizer (memcheck, then racecheck) on one tiny forward+backward case per GPU backend;
7. the summary, with a verdict (met / not met / not measured) on every GPU target.

Everything lands in ``$OUT`` (or ``--out``), seven files, no folders: ``summary.md`` (every stage,
verdict and table), ``results.csv`` (the benchmark rows), ``results.json`` (all of it, machine
readable), ``tests.xml`` (JUnit: both test stages and the sanitizer cases), and the logs
``setup.log`` (stages 1-2), ``tests.log`` (3, 4, 6) and ``bench.log`` (5).

The whole check keeps within ``--budget-s`` (default 420 s, or ``GPU_CHECK_BUDGET_S``): each stage's
limit is cut to what is left after the later stages' shares. The driver uses the standard
library only (the package may not build); the machine's ``python3`` (or ``PYTHON``) runs each
stage in a subprocess. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ("summary.md", "results.csv", "results.json", "tests.xml", "setup.log", "tests.log", "bench.log")
TEST_FILES = {"cuda": "tests/test_xattn_similarity_cuda.py", "triton": "tests/test_xattn_similarity_triton.py"}
PYTEST_MARKS = "gpu and not slow"
# (nominal seconds, least seconds worth starting with). The benchmark stage takes what the others
# leave; each limit is cut so that the later stages keep at least their least share.
STAGES = (
    (1, "environment", 20, 5),
    (2, "build", 150, 20),
    (3, "CUDA GPU tests", 60, 15),
    (4, "Triton GPU tests", 75, 15),
    (5, "benchmarks", None, 30),
    (6, "compute-sanitizer", 50, 10),
    (7, "summary", 5, 5),
)
PER_TEST_TIMEOUT_S = {"cuda": 60, "triton": 120}  # pytest-timeout, per test
COMPILE_BUDGET_S = 60  # torch.compile of the compiled peer, over the whole benchmark stage
SANITIZER_CASES = (("cuda", "memcheck"), ("triton", "memcheck"), ("cuda", "racecheck"), ("triton", "racecheck"))


@dataclass
class Stage:
    number: int
    name: str
    status: str = "not run"  # ok, failed, timed out, no GPU, skipped, not run
    seconds: float = 0.0
    limit_s: float = 0.0
    detail: str = ""
    log: str = ""


@dataclass
class Check:
    """The state of one run of the check: its options, clock, stages and what they found."""

    out: str
    python: str
    dry_run: bool
    budget_s: float
    skip_build: bool = False
    repo: str = REPO  # the tree the stages run in
    start: float = field(default_factory=time.time)
    work: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gpu-check-"))
    stages: list = field(default_factory=list)
    env_facts: dict = field(default_factory=dict)
    tests: list = field(default_factory=list)  # dicts: name, file, outcome, message, suite
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    sanitizer: list = field(default_factory=list)  # dicts: backend, tool, outcome, detail, seconds
    extra_env: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def gpu(self) -> bool:
        return bool(self.env_facts.get("gpu")) and not self.dry_run

    def env(self, **more) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env, **more}
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the same stages, with no GPU
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def log(self, name: str) -> str:
        return os.path.join(self.out, name)

    def run(self, cmd: list, timeout: float, log: str, **env) -> tuple:
        """:func:`run_cmd` in the tree, with the stages' environment and ``env`` on top."""
        return run_cmd(cmd, timeout, log, env=self.env(**env), cwd=self.repo)


def stage_limit(check: Check, number: int) -> float:
    """This stage's limit: its nominal share, cut so that every later stage keeps its least share."""
    later = sum(least for n, _, _, least in STAGES if n > number)
    nominal = next(nom for n, _, nom, _ in STAGES if n == number)
    if nominal is None:  # the benchmarks: all that the later stages' nominal shares leave
        nominal = check.left() - sum(nom for n, _, nom, _ in STAGES if n > number)
    return max(0.0, min(nominal, check.left() - later))


def run_cmd(cmd: list, timeout: float, log_path: str, env: Optional[dict] = None, cwd: str = REPO) -> tuple:
    """Run ``cmd`` with its output appended to ``log_path``; returns (exit code, timed out, seconds).

    Its process group gets SIGINT a little before ``timeout`` (pytest then still writes its report)
    and SIGKILL at ``timeout``: the command never outlasts its limit by more than a second or two.
    """
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}    # limit {timeout:.0f} s\n")
        log.flush()
        if timeout < 1:
            log.write("not run: no time left\n")
            return None, True, 0.0
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        except OSError as e:
            log.write(f"could not start: {e}\n")
            return 127, False, time.time() - t0
        grace = min(10.0, 0.1 * timeout)
        try:
            return proc.wait(timeout - grace), False, time.time() - t0
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        log.write(f"\n[gpu check] stopped at its limit of {timeout:.0f} s\n")
        return proc.returncode, True, time.time() - t0


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:] if line.strip())
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ 1. environment
_ENV_SCRIPT = r"""
import json, os, platform, sys
facts = dict(python=platform.python_version(), cores=os.cpu_count())
try:
    import torch
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                     multiprocessors=p.multi_processor_count)
except Exception as e:
    facts["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("triton", "pytest", "pytest_timeout", "setuptools", "pip"):
    try:
        m = __import__(mod)
        facts[mod] = getattr(m, "__version__", "present")
    except Exception:
        facts[mod] = None
print("FACTS " + json.dumps(facts))
"""


def _which(tool: str) -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    places = (os.path.join(home, "bin", tool), os.path.join(home, tool, tool))  # compute-sanitizer has its own folder
    return shutil.which(tool) or next((p for p in places if os.path.exists(p)), None)


def stage_environment(check: Check, st: Stage) -> None:
    log = check.log("setup.log")
    st.log = "setup.log"
    deadline = time.time() + st.limit_s
    facts = {}
    smi = _which("nvidia-smi")
    if smi:
        run_cmd([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm", "--format=csv"],
                min(10, st.limit_s / 4), log)
        run_cmd([smi], min(10, st.limit_s / 4), log)
        facts["driver"] = _smi_field(smi, "driver_version")
    nvcc = _which("nvcc")
    if nvcc:
        run_cmd([nvcc, "--version"], min(10, st.limit_s / 4), log)
        facts["nvcc"] = _grep_file(log, r"release ([0-9.]+)")
    facts["compute_sanitizer"] = _which("compute-sanitizer")
    rc, timed_out, _ = check.run([check.python, "-c", _ENV_SCRIPT], deadline - time.time(), log)
    line = _grep_file(log, r"^FACTS (.*)$")
    if line:
        facts.update(json.loads(line))
    check.env_facts = facts
    gpu = facts.get("gpu") if not check.dry_run else None
    st.detail = (f"GPU {gpu or 'none (no GPU)'}; driver {facts.get('driver') or '-'}; torch {facts.get('torch')} "
                 f"(CUDA {facts.get('torch_cuda')}); triton {facts.get('triton')}; nvcc {facts.get('nvcc') or 'not found'}; "
                 f"python {facts.get('python')}; {facts.get('cores')} cores; pytest {facts.get('pytest')}, "
                 f"pytest-timeout {facts.get('pytest_timeout') or 'missing'}")
    st.status = "timed out" if timed_out else ("ok" if "torch" in facts else "failed")


def _smi_field(smi: str, name: str) -> Optional[str]:
    try:
        out = subprocess.run([smi, f"--query-gpu={name}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _grep_file(path: str, pattern: str) -> Optional[str]:
    try:
        with open(path, errors="replace") as f:
            found = re.findall(pattern, f.read(), flags=re.M)
        return found[-1] if found else None
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ 2. build
def stage_build(check: Check, st: Stage) -> None:
    log = check.log("setup.log")
    st.log = "setup.log"
    deadline = time.time() + st.limit_s
    cores = str(check.env_facts.get("cores") or os.cpu_count() or 1)
    arch = check.env_facts.get("capability") or "9.0"
    # PIP_BREAK_SYSTEM_PACKAGES: the machine's python3 may be an "externally managed" system Python
    build_env = dict(MAX_JOBS=cores, MEFN_CUDA_ARCHS=arch, PIP_BREAK_SYSTEM_PACKAGES="1",
                     PIP_DISABLE_PIP_VERSION_CHECK="1")
    if os.path.exists("/usr/local/cuda/bin/nvcc") and "CUDA_HOME" not in os.environ:
        build_env["CUDA_HOME"] = "/usr/local/cuda"
    pip = [check.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    inplace = [check.python, "setup.py", "build_ext", "--inplace"]
    how = ""
    if check.dry_run or check.skip_build:
        why = "dry run" if check.dry_run else "--skip-build"
        with open(log, "a") as f:
            f.write(f"\n[{why}] not rebuilt; on the GPU machine this stage runs, with "
                    f"{' '.join(f'{k}={v}' for k, v in build_env.items())}:\n  {' '.join(pip)}\n"
                    f"  and, if that fails or times out: {' '.join(inplace)}\n")
        how = f"{why}: the installed package, not rebuilt"
        st.status = "skipped"
    else:
        # pip gets the stage but the 15 s of the info below; the in-place build gets what a failing
        # pip leaves (both compile the same sources from scratch, so after a timeout none is left)
        rc, timed_out, secs = check.run(pip, max(1.0, deadline - time.time() - 15), log, **build_env)
        if rc == 0 and not timed_out:
            how, st.status = "pip install -e . ok", "ok"
        else:
            first = f"pip install {'timed out' if timed_out else f'failed (exit {rc})'} after {secs:.0f} s"
            rc, timed_out, _ = check.run(inplace, deadline - time.time() - 15, log, **build_env)
            ok = rc == 0 and not timed_out
            how = (f"{first}; in-place build {'ok' if ok else 'timed out' if timed_out else f'failed (exit {rc})'}; "
                   "the package runs from the tree")
            st.status = "ok" if ok else ("timed out" if timed_out else "failed")
            # from the tree, with or without its extension: the reference and Triton backends still run
            check.extra_env["PYTHONPATH"] = check.repo + os.pathsep + os.environ.get("PYTHONPATH", "")
            _link_kernels(check, log)
    info_log = os.path.join(check.work, "info.txt")
    check.run([check.python, "-m", "mefn_fast.info"], min(60.0, max(10.0, deadline - time.time())), info_log)
    with open(info_log, errors="replace") as f:
        info = f.read()
    with open(log, "a") as f:
        f.write(info)
    backends = re.findall(r"^\s+(cuda|triton|cpu|reference)\s+(available|unavailable: .*)$", info, flags=re.M)
    check.env_facts["backends"] = {name: state for name, state in backends}
    check.env_facts["extension"] = _grep_file(info_log, r"^extension: (.*)$")
    st.detail = (f"{how}; extension: {check.env_facts['extension'] or 'unknown'}; "
                 + "; ".join(f"{n} {s[:90]}" for n, s in backends if n in ("cuda", "triton")))


def _link_kernels(check: Check, log: str) -> None:
    """Run from the tree, ``mefn_fast.kernels`` (installed from the top-level ``kernels/``) is missing: link it."""
    link = os.path.join(check.repo, "mefn_fast", "kernels")
    if not os.path.lexists(link) and os.path.isdir(os.path.join(check.repo, "kernels")):
        os.symlink(os.path.join("..", "kernels"), link)
        with open(log, "a") as f:
            f.write("[gpu check] mefn_fast/kernels -> ../kernels linked for the package run from the tree\n")


# ------------------------------------------------------------------------------------ 3-4. GPU tests
def stage_tests(check: Check, st: Stage, backend: str) -> None:
    log = check.log("tests.log")
    st.log = "tests.log"
    xml = os.path.join(check.work, f"{backend}.xml")
    cmd = [check.python, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-m", PYTEST_MARKS, "-v", "-rfE",
           "--durations=10", f"--junitxml={xml}", TEST_FILES[backend]]
    if check.env_facts.get("pytest_timeout"):
        cmd.insert(-1, f"--timeout={PER_TEST_TIMEOUT_S[backend]}")
    start = os.path.getsize(log) if os.path.exists(log) else 0
    rc, timed_out, _ = check.run(cmd, st.limit_s, log, MEFN_TRITON_SINGLE_CONFIG="1")
    results = parse_junit(xml, TEST_FILES[backend]) if os.path.exists(xml) else None
    from_log = results is None
    if from_log:  # pytest was stopped before it wrote its report: read the verbose lines
        with open(log, errors="replace") as f:
            f.seek(start)
            results = parse_pytest_log(f.read(), TEST_FILES[backend])
    for r in results:
        r["suite"] = st.name
    check.tests += results
    count = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{v} {k}" for k, v in count.items() if v) or "no tests ran"
    if from_log:
        summary += " (read from the log: pytest wrote no report)"
    if not check.env_facts.get("pytest_timeout"):
        summary += "; pytest-timeout missing: no per-test limit"
    if not results and rc not in (0, 5):
        summary += f" (exit {rc}: {_tail(log, 2)})"
    st.detail = f"{summary}; pytest -m \"{PYTEST_MARKS}\" {TEST_FILES[backend]}"
    if timed_out:
        st.status = "timed out"
    elif count["failed"] or count["error"] or rc not in (0, 5):
        st.status = "failed"
    elif not check.gpu():
        st.status = "no GPU"
    else:
        st.status = "ok"


def parse_junit(path: str, file: str) -> list:
    """One dict per test case of a JUnit XML file: name, file, outcome, message."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return []
    out = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                text = (el.get("message") or el.text or "").strip()
                outcome, message = name, (text.splitlines() or [""])[0][:300]
                break
        out.append(dict(name=case.get("name", ""), file=file, outcome=outcome, message=message,
                        seconds=float(case.get("time") or 0)))
    return out


_LOG_LINE = re.compile(r"^(\S+\.py)::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)


def parse_pytest_log(text: str, file: str) -> list:
    """The outcomes that ``pytest -v`` printed, for a run stopped before its JUnit report."""
    names = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
             "XFAIL": "skipped"}
    return [dict(name=name, file=file, outcome=names[word], message="", seconds=0.0)
            for path, name, word in _LOG_LINE.findall(text)]


# --------------------------------------------------------------------------------------- 5. benchmarks
def stage_bench(check: Check, st: Stage) -> None:
    log = check.log("bench.log")
    st.log = "bench.log"
    out = os.path.join(check.work, "bench")
    # start no workload in the last 45 s: one eval-coco5k-gpu workload takes about that long
    budget = max(1.0, st.limit_s - 45)
    cmd = [check.python, "benchmarks/bench_xattn_similarity_gpu.py", "--out", out, "--budget-s", f"{budget:.0f}",
           "--compile-budget-s", str(COMPILE_BUDGET_S)]
    if check.dry_run:
        cmd.append("--dry-run")
    rc, timed_out, _ = check.run(cmd, st.limit_s, log, MEFN_TRITON_SINGLE_CONFIG="1", TQDM_DISABLE="1")
    device = "cpu" if check.dry_run else "cuda"
    path = os.path.join(out, f"bench-{device}.json")
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        check.rows, check.skipped = data["rows"], data.get("skipped", [])
        shutil.copyfile(os.path.join(out, f"bench-{device}.csv"), check.log("results.csv"))
    measured = list(dict.fromkeys(f"{r['workload']} {r['dtype']}" for r in check.rows))
    st.detail = (f"{len(measured)} workloads measured ({', '.join(measured) or 'none'})"
                 + (f"; not run: {'; '.join(check.skipped)}" if check.skipped else "")
                 + ("; dry run: tiny sizes on the CPU" if check.dry_run else "")
                 + (f"; exit {rc}: {_tail(log, 2)}" if rc not in (0, None) and not timed_out else ""))
    st.status = "timed out" if timed_out else ("ok" if rc == 0 and check.rows else "failed")
    if st.status == "ok" and not check.gpu():
        st.status = "no GPU"


# ------------------------------------------------------------------------------------ 6. compute-sanitizer
def sanitizer_case(backend: str) -> int:
    """One tiny forward+backward of ``backend`` on the GPU (bf16, ragged, both directions), checked
    against the reference; run under compute-sanitizer. Exit 3: the backend is unavailable."""
    import torch

    import mefn_fast

    if mefn_fast.backends.BACKENDS[backend].unavailable_reason():
        print(f"{backend} unavailable: {mefn_fast.backends.BACKENDS[backend].unavailable_reason()}")
        return 3
    g = torch.Generator(device="cuda").manual_seed(0)
    regions = torch.randn(2, 5, 64, device="cuda", generator=g).bfloat16().requires_grad_(True)
    words = torch.randn(3, 4, 64, device="cuda", generator=g).bfloat16().requires_grad_(True)
    rl, wl = torch.tensor([5, 3], device="cuda"), torch.tensor([4, 1, 2], device="cuda")
    s = mefn_fast.xattn_similarity(regions, rl, words, wl, direction="both", backend=backend)
    grads = torch.autograd.grad(s.float().sum(), (regions, words))
    ref = mefn_fast.xattn_similarity(regions.double(), rl, words.double(), wl, direction="both", backend="reference")
    torch.cuda.synchronize()
    err = float((s.double() - ref).abs().max())
    assert err < 0.05 and all(bool(torch.isfinite(x).all()) for x in grads), f"wrong result: max error {err}"
    print(f"sanitizer case ok: {backend}, max error {err:.1e}")
    return 0


def stage_sanitizer(check: Check, st: Stage) -> None:
    log = check.log("tests.log")
    st.log = "tests.log"
    tool = check.env_facts.get("compute_sanitizer")
    if not check.gpu():
        st.status = "no GPU"
        st.detail = f"compute-sanitizer {'at ' + tool if tool else 'not found'}; nothing run"
        check.sanitizer = [dict(backend=b, tool=t, outcome="skipped", detail="no GPU", seconds=0.0)
                           for b, t in SANITIZER_CASES]
        return
    if not tool:
        st.status, st.detail = "failed", "compute-sanitizer not found (PATH, CUDA_HOME/bin)"
        return
    deadline = time.time() + st.limit_s
    for backend, kind in SANITIZER_CASES:
        left = deadline - time.time()
        if left < 10:
            check.sanitizer.append(dict(backend=backend, tool=kind, outcome="skipped", detail="no time left", seconds=0.0))
            continue
        cmd = [tool, f"--tool={kind}", "--error-exitcode=99", *(["--leak-check=no"] if kind == "memcheck" else []),
               check.python, "benchmarks/gpu_check.py", "--sanitizer-case", backend]
        start = os.path.getsize(log)
        rc, timed_out, secs = check.run(cmd, min(left, 40.0), log, MEFN_TRITON_SINGLE_CONFIG="1")
        with open(log, errors="replace") as f:
            f.seek(start)
            text = f.read()
        errors = [line.strip() for line in text.splitlines() if line.startswith("=========") and
                  re.search(r"Invalid|race|Error|error", line)][:3]
        outcome = ("timed out" if timed_out else "skipped" if rc == 3 else "clean" if rc == 0 and "sanitizer case ok" in text
                   else "errors" if rc == 99 else "failed")
        detail = "; ".join(errors) or (_tail(log, 1) if outcome in ("failed", "skipped") else "")
        check.sanitizer.append(dict(backend=backend, tool=kind, outcome=outcome, detail=detail, seconds=secs))
    bad = [c for c in check.sanitizer if c["outcome"] in ("errors", "failed", "timed out")]
    st.status = "failed" if bad else "ok"
    st.detail = "; ".join(f"{c['backend']} {c['tool']}: {c['outcome']}" for c in check.sanitizer)


# ---------------------------------------------------------------------------------------- 7. summary
def _load_targets():
    """mefn_fast/bench/targets.py by its path: standard library only, so it loads without the package."""
    path = os.path.join(REPO, "mefn_fast", "bench", "targets.py")
    spec = importlib.util.spec_from_file_location("mefn_fast_gpu_check_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_junit(check: Check) -> None:
    """tests.xml: one testsuite per test stage and one for the sanitizer cases."""
    root = ET.Element("testsuites", name="mefn_fast GPU check")
    suites = list(dict.fromkeys(t["suite"] for t in check.tests))
    for suite in suites:
        cases = [t for t in check.tests if t["suite"] == suite]
        el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)),
                           failures=str(sum(t["outcome"] == "failed" for t in cases)),
                           errors=str(sum(t["outcome"] == "error" for t in cases)),
                           skipped=str(sum(t["outcome"] == "skipped" for t in cases)))
        for t in cases:
            case = ET.SubElement(el, "testcase", classname=t["file"], name=t["name"], time=f"{t['seconds']:.3f}")
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}.get(t["outcome"])
            if tag:
                ET.SubElement(case, tag, message=t["message"])
    el = ET.SubElement(root, "testsuite", name="compute-sanitizer", tests=str(len(check.sanitizer)))
    for c in check.sanitizer:
        case = ET.SubElement(el, "testcase", classname="compute-sanitizer", name=f"{c['tool']}[{c['backend']}]",
                             time=f"{c['seconds']:.3f}")
        if c["outcome"] == "skipped":
            ET.SubElement(case, "skipped", message=c["detail"])
        elif c["outcome"] != "clean":
            ET.SubElement(case, "failure", message=f"{c['outcome']}: {c['detail']}")
    ET.ElementTree(root).write(check.log("tests.xml"), encoding="utf-8", xml_declaration=True)


def _bench_table(rows: list) -> str:
    head = ("| workload | dtype | pass | backend | median ms | vs packed floor | vs padded floor | vs strongest peer | "
            "peak extra MiB | note |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        med = "-" if r["median_s"] is None else f"{r['median_s'] * 1e3:.3f}"

        def x(v, fmt=".2f"):
            return "-" if v is None else format(v, fmt)
        peer = r.get("vs_strongest_peer")
        vs_peer = "-" if peer is None else (f"{peer:.2f}x faster" if peer >= 1 else f"{1 / peer:.2f}x slower")
        mem = None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / 2 ** 20
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['pass_']} | {r['backend']} | {med} | "
                     f"{x(r['vs_packed_floor'])} | {x(r['vs_padded_floor'])} | {vs_peer} | {x(mem, '.0f')} | "
                     f"{(r.get('note') or '').replace('|', '/')} |")
    return "\n".join(lines)


def write_summary(check: Check) -> str:
    """summary.md, results.json and tests.xml from everything the stages found; returns what to print:
    the same sections with the verdicts last (a reply that keeps only the end of the output keeps them)."""
    try:
        targets = _load_targets()
        verdicts = targets.evaluate(check.rows, check.tests, gpu=check.gpu())
        verdict_table = targets.format_verdicts(verdicts)
    except Exception as e:  # the summary is written whatever else broke
        verdicts, verdict_table = [], f"(the targets could not be evaluated: {type(e).__name__}: {e})"
    f = check.env_facts
    elapsed = time.time() - check.start
    lines = [f"# mefn_fast GPU check{' (dry run: no GPU)' if check.dry_run else ''}", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}; commit {_commit(check.repo)}; GPU {f.get('gpu') if check.gpu() else 'none'}, "
             f"driver {f.get('driver') or '-'}; torch {f.get('torch')}, triton {f.get('triton')}, nvcc {f.get('nvcc') or '-'}; "
             f"{elapsed:.0f} s of a {check.budget_s:.0f} s budget."]
    stages = ["## Stages", "", "| # | stage | status | seconds | limit s | detail | log |", "|---|---|---|---|---|---|---|"]
    for s in check.stages:
        stages.append(f"| {s.number} | {s.name} | {s.status} | {s.seconds:.0f} | {s.limit_s:.0f} | "
                      f"{s.detail.replace('|', '/')} | {s.log} |")
    verdict_part = ["## Targets", "",
                    "Ratios from one interleaved run of the benchmark stage; the packed floor is one cuBLAS product "
                    "of the valid region rows by the valid word rows (docs/math.md, section 4). Triton ran one "
                    "heuristic configuration per kernel (MEFN_TRITON_SINGLE_CONFIG=1), not its autotuned best.", "",
                    verdict_table]
    bench = ["## Benchmarks", "", _bench_table(check.rows) if check.rows else "No benchmark rows (see bench.log)."]
    if check.skipped:
        bench += ["", "Not run: " + "; ".join(check.skipped)]
    bad = [t for t in check.tests if t["outcome"] in ("failed", "error")]
    failures = ["## Failed tests", ""]
    failures += [f"- {t['file']}::{t['name']}: {t['message'] or t['outcome']}" for t in bad] or ["None."]
    failures += ["", "## compute-sanitizer", ""]
    failures += [f"- {c['tool']} on {c['backend']}: {c['outcome']}{' (' + c['detail'] + ')' if c['detail'] else ''}"
                 for c in check.sanitizer] or ["Not run."]
    files = ["## Files", "", "summary.md (this), results.csv (benchmark rows), results.json (everything), "
             "tests.xml (JUnit), setup.log (stages 1-2), tests.log (3, 4, 6), bench.log (5)."]
    with open(check.log("summary.md"), "w") as fh:
        fh.write("\n\n".join("\n".join(part) for part in (lines, stages, verdict_part, bench, failures, files)) + "\n")
    with open(check.log("results.json"), "w") as fh:
        json.dump(dict(check=dict(dry_run=check.dry_run, budget_s=check.budget_s, elapsed_s=round(elapsed, 1)),
                       environment=f, stages=[asdict(s) for s in check.stages], verdicts=verdicts, tests=check.tests,
                       sanitizer=check.sanitizer, rows=check.rows, skipped=check.skipped), fh, indent=1)
    write_junit(check)
    if not os.path.exists(check.log("results.csv")):
        with open(check.log("results.csv"), "w", newline="") as fh:
            csv.writer(fh).writerow(["workload", "dtype", "backend", "median_s", "note"])
    return "\n\n".join("\n".join(part) for part in (bench, failures, lines, stages, verdict_part)) + "\n"


def _commit(repo: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------- driver
def run_check(check: Check) -> Check:
    """Run the seven stages in order, each under its limit; the summary is written whatever happens."""
    os.makedirs(check.out, exist_ok=True)
    for name in OUTPUTS:
        if name.endswith(".log"):
            open(check.log(name), "w").close()
    actions = {1: stage_environment, 2: stage_build, 3: lambda c, s: stage_tests(c, s, "cuda"),
               4: lambda c, s: stage_tests(c, s, "triton"), 5: stage_bench, 6: stage_sanitizer}
    try:
        for number, name, _, _ in STAGES:
            st = Stage(number, name)
            check.stages.append(st)
            if number == 7:
                break
            st.limit_s = stage_limit(check, number)
            print(f"[gpu check] stage {number} {name}: limit {st.limit_s:.0f} s", flush=True)
            t0 = time.time()
            if st.limit_s < 1:
                st.status, st.detail = "skipped", "no time left in the budget"
                continue
            try:
                actions[number](check, st)
            except Exception as e:  # record it; the next stage still runs
                st.status, st.detail = "failed", f"the check itself failed here: {type(e).__name__}: {e}"
            st.seconds = time.time() - t0
            print(f"[gpu check] stage {number} {name}: {st.status} in {st.seconds:.0f} s; {st.detail[:300]}", flush=True)
    finally:
        summary = check.stages[-1] if check.stages and check.stages[-1].number == 7 else Stage(7, "summary")
        if summary not in check.stages:
            check.stages.append(summary)
        t0 = time.time()
        summary.limit_s, summary.status, summary.log = stage_limit(check, 7), "ok", "summary.md"
        write_summary(check)  # once to make the files, once more with this stage's own time and file count
        summary.seconds = time.time() - t0
        summary.detail = f"{len(os.listdir(check.out))} files in {check.out}"
        text = write_summary(check)
        shutil.rmtree(check.work, ignore_errors=True)
    print(text)
    return check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "gpu-check-out"),
                   help="folder for the seven output files (default: $OUT, else ./gpu-check-out)")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", "420")),
                   help="wall-time budget of the whole check (default: $GPU_CHECK_BUDGET_S, else 420)")
    p.add_argument("--python", default=os.environ.get("PYTHON") or "python3",
                   help="the interpreter that runs the stages (default: $PYTHON, else python3)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on a machine without a GPU")
    p.add_argument("--skip-build", action="store_true", help="use the installed package (a rerun on a warm machine)")
    p.add_argument("--sanitizer-case", choices=sorted(TEST_FILES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sanitizer_case:
        return sanitizer_case(args.sanitizer_case)
    check = run_check(Check(out=os.path.abspath(args.out), python=args.python, dry_run=args.dry_run,
                            budget_s=args.budget_s, skip_build=args.skip_build))
    return 0 if all(s.status in ("ok", "no GPU", "skipped") for s in check.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
