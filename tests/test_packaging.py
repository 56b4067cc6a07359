"""Every way of installing builds the extension or stops saying why (setup.py, pyproject.toml,
MANIFEST.in), the build record tells the truth about the build it sits in, and a build for another
torch is never loaded (mefn_fast/backends/build.py).

The fast tests run setup.py's build_ext on small trees in a temporary folder (missing sources, a
compiler error, a failed CUDA compile, no torch). The ``slow`` ones do what a user does: build a
wheel from the checkout and one from its sdist, and an editable install with pip 23, all three at
once with ``MEFN_SKIP_CUDA=1``; install them into fresh virtual environments that reuse this
environment's torch (a ``.pth`` file, no download) and use them from a folder outside the source
tree; and run ``pip install .`` where the build cannot see torch.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mefn_fast
from mefn_fast.backends import build

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_SITE = pathlib.Path(torch.__file__).resolve().parents[1]  # where this environment's torch lives
NO_TORCH_FIX = "install torch first, then pip install --no-build-isolation ."
# builds here: CPU ops only (a CUDA compile takes minutes), never an inherited switch
BUILD_ENV = {k: v for k, v in os.environ.items() if k not in ("MEFN_SKIP_EXT", "MEFN_FORCE_CUDA", "PYTHONPATH")}
BUILD_ENV["MEFN_SKIP_CUDA"] = "1"


def run(cmd, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured (stdout and stderr together, as a user sees them)."""
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or BUILD_ENV, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check(cmd, **kwargs) -> str:
    p = run(cmd, **kwargs)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-6000:]}"
    return p.stdout


def make_venv(path: pathlib.Path, with_torch: bool = True) -> pathlib.Path:
    """A fresh virtual environment (its own pip 23 and setuptools, from ensurepip); with_torch puts
    this environment's site-packages after its own, for torch and numpy."""
    check([sys.executable, "-m", "venv", path])
    if with_torch:
        site = next((path / "lib").glob("python*/site-packages"))
        (site / "reuse-torch.pth").write_text(f"{TORCH_SITE}\n")
    return path / "bin" / "python"


# ------------------------------------------------------------------------------------------------
# The package under test


def test_this_install_has_its_extension_or_was_told_to_skip_it():
    """An install that silently lost its extension would skip the cpu and cuda tests: catch it."""
    info = build.build_info()
    if not info.get("built"):
        assert "MEFN_SKIP_EXT" in str(info.get("reason")), build.extension_problem(info)
        return
    assert build.extension_problem(info) is None
    assert info["torch"] and info["python"] and info["platform"] and info["compiler"]
    assert "cpu" in mefn_fast.available_backends()


# ------------------------------------------------------------------------------------------------
# A build for another torch is refused, with the reason and the fix


def record(**changes) -> dict:
    base = {"built": True, "cuda": False, "reason": None, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}
    return {**base, **changes}


def other_series(version: str, minor_step: int = -1) -> str:
    major, minor = map(int, re.match(r"(\d+)\.(\d+)", version).groups())
    return f"{major}.{minor + minor_step}.0"


def test_the_kernels_folder_never_shadows_the_pypi_package_of_that_name(tmp_path):
    # From the root of a checkout (python -m / -c there put the root on sys.path) the folder
    # kernels/ (installed as mefn_fast.kernels) is importable as `kernels`, the name of Hugging
    # Face's package that transformers 5 imports; it hands that name back to the package. A
    # stand-in package of that name, found after the root on sys.path, plays the installed one.
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    code = ("import kernels, mefn_fast.kernels as ours\n"
            "from kernels import CUDAProperties\n"
            "print(CUDAProperties, kernels.__file__ != ours.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = check([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert out.strip().endswith("the installed package True"), out


def test_a_build_for_this_release_series_loads():
    assert build.extension_problem(record()) is None
    major_minor = re.match(r"\d+\.\d+", torch.__version__).group(0)
    assert build.extension_problem(record(torch=f"{major_minor}.99")) is None  # a patch release keeps the ABI


def test_a_build_for_another_torch_release_is_refused():
    built = other_series(torch.__version__)
    problem = build.extension_problem(record(torch=built))
    assert f"built against torch {built} but torch {torch.__version__} is running" in problem
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in problem
    assert f"torch=={built}" in problem


def test_another_cxx11_abi_is_refused():
    problem = build.extension_problem(record(cxx11_abi=not torch._C._GLIBCXX_USE_CXX11_ABI))
    assert "_GLIBCXX_USE_CXX11_ABI" in problem and "--force-reinstall" in problem


def test_cuda_ops_for_another_cuda_major_are_refused():
    problem = build.extension_problem(record(cuda=True, torch_cuda="1.0"))
    assert "CUDA ops built for torch's CUDA 1.0" in problem and "--force-reinstall" in problem
    if torch.version.cuda is not None:
        assert build.extension_problem(record(cuda=True)) is None


def test_a_build_without_the_extension_says_how_to_get_it():
    problem = build.extension_problem({"built": False, "reason": "skipped: MEFN_SKIP_EXT=1 at install time"})
    assert problem.startswith("C++ extension not built: skipped: MEFN_SKIP_EXT=1")
    assert "pip install --no-build-isolation ." in problem


@pytest.fixture
def cpu_backend_unavailable(monkeypatch):
    """The cpu backend as an install without the extension sees it, and a fresh warning state."""
    from mefn_fast import backends

    reason = "C++ extension not built: skipped: MEFN_SKIP_EXT=1 at install time; to build it, ..."
    monkeypatch.setitem(backends._LOADED, "cpu", (None, None, reason))
    monkeypatch.setattr(backends, "_chosen", {})
    monkeypatch.setattr(backends, "_fallback_warned", set())
    return reason


def test_auto_warns_once_when_it_falls_back_to_the_reference(cpu_backend_unavailable):
    from conftest import make_inputs

    r, rl, w, wl = make_inputs(dtype=torch.float32)
    with pytest.warns(RuntimeWarning) as caught:
        s = mefn_fast.xattn_similarity(r, rl, w, wl, backend="auto")
    (message,) = [str(c.message) for c in caught if str(c.message).startswith("mefn_fast")]
    assert "falls back to the plain-PyTorch 'reference' backend" in message and "cpu float32" in message
    assert cpu_backend_unavailable in message  # the reason, with its fix
    torch.testing.assert_close(s, mefn_fast.xattn_similarity(r, rl, w, wl, backend="reference"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mefn_fast.xattn_similarity(r, rl, w, wl, backend="auto")  # once only
        mefn_fast.xattn_similarity(r.half(), rl, w.half(), wl, backend="auto")  # once per backend, any dtype
    with pytest.raises(ValueError, match="MEFN_SKIP_EXT"):
        mefn_fast.xattn_similarity(r, rl, w, wl, backend="cpu")


# ------------------------------------------------------------------------------------------------
# setup.py on small trees: what it says when it cannot build what was asked for

PY_MODULE = """#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
"""


def small_tree(tmp_path: pathlib.Path, files: dict) -> pathlib.Path:
    """setup.py and pyproject.toml of the checkout beside the given csrc/ files."""
    tree = tmp_path / "tree"
    for name in ("setup.py", "pyproject.toml"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    return tree


def build_ext(tree: pathlib.Path, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "setup.py", "build_ext"], cwd=tree, env={**BUILD_ENV, **env}, timeout=600)


def built_record(tree: pathlib.Path) -> dict:
    (path,) = tree.glob("build/lib*/mefn_fast/_build_info.json")
    return json.loads(path.read_text())


def test_missing_sources_stop_the_build(tmp_path):
    tree = small_tree(tmp_path, {"csrc/op.cpp": '#include "op_host.h"\n' + PY_MODULE,
                                 "csrc/op_host.h": '#include "cuda/op_pair.h"\n'})
    p = build_ext(tree)
    assert p.returncode != 0
    assert "the extension's sources are incomplete; missing: csrc/cuda/op_pair.h (included by csrc/op_host.h)" in p.stdout
    assert "MEFN_SKIP_EXT=1 pip install ." in p.stdout


def test_a_compiler_error_stops_the_build(tmp_path):
    tree = small_tree(tmp_path, {"csrc/op.cpp": "#error deliberately broken\n"})
    p = build_ext(tree)
    assert p.returncode != 0
    assert "mefn_fast: compiling mefn_fast._C failed" in p.stdout and "deliberately broken" in p.stdout
    assert "MEFN_SKIP_EXT=1 pip install ." in p.stdout


def test_torch_missing_from_the_build_environment_stops_the_build(tmp_path):
    hidden = tmp_path / "hide-torch" / "torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    tree = small_tree(tmp_path, {"csrc/op.cpp": PY_MODULE})
    p = build_ext(tree, PYTHONPATH=str(hidden.parent))
    assert p.returncode != 0
    assert "torch is not importable in the build environment" in p.stdout
    assert NO_TORCH_FIX in p.stdout


def _cuda_toolkit() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return torch.version.cuda is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(not _cuda_toolkit(), reason="needs a CUDA build of torch and a CUDA toolkit (nvcc)")
def test_a_failed_cuda_compile_falls_back_to_the_cpu_ops_with_a_warning(tmp_path):
    tree = small_tree(tmp_path, {"csrc/op.cpp": PY_MODULE, "csrc/cuda/op.cu": "#error deliberately broken\n"})
    env = {k: v for k, v in BUILD_ENV.items() if k != "MEFN_SKIP_CUDA"}
    p = run([sys.executable, "setup.py", "build_ext"], cwd=tree, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "WARNING: mefn_fast: the CUDA sources of mefn_fast._C failed to compile" in p.stdout
    info = built_record(tree)
    assert info["built"] and not info["cuda"] and info["reason"].startswith("CUDA ops failed to build")
    assert list(tree.glob("build/lib*/mefn_fast/_C.*.so"))
    forced = run([sys.executable, "setup.py", "build_ext"], cwd=tree, env={**env, "MEFN_FORCE_CUDA": "1"}, timeout=600)
    assert forced.returncode != 0 and "mefn_fast: compiling mefn_fast._C failed" in forced.stdout


# ------------------------------------------------------------------------------------------------
# What a user does: wheels, the sdist, an editable install, pip install . (slow: three compiles)

# Run inside an installed copy, from a folder outside the source tree: prints what it found as JSON.
USE_INSTALLED = textwrap.dedent("""
    import json, sys, warnings
    import torch, mefn_fast
    from mefn_fast.backends.build import RECORD_PATH, build_info

    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 7, 11, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, 11, dtype=torch.float64, generator=g)
    rl, wl = torch.tensor([7, 1, 4]), torch.tensor([5, 1, 3, 2])

    def scores_and_grads(backend):
        rr, ww = r.clone().requires_grad_(), w.clone().requires_grad_()
        s = mefn_fast.xattn_similarity(rr, rl, ww, wl, direction="both", backend=backend)
        s.pow(2).sum().backward()
        return [s.detach(), rr.grad, ww.grad]

    def rel_err(a, b):
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))

    ref = scores_and_grads("reference")
    out = {"file": mefn_fast.__file__, "record_path": RECORD_PATH, "record": build_info(),
           "torch": torch.__version__, "available": mefn_fast.available_backends(),
           "status": mefn_fast.backend_status()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["auto_err"] = rel_err(scores_and_grads("auto"), ref)
    out["warnings"] = [str(c.message) for c in caught if str(c.message).startswith("mefn_fast")]
    try:
        out["cpu_err"] = rel_err(scores_and_grads("cpu"), ref)
    except ValueError as e:
        out["cpu_error"] = str(e)
    out["C_loaded"] = "mefn_fast._C" in sys.modules
    print(json.dumps(out))
""")


def use_installed(python: pathlib.Path, cwd: pathlib.Path) -> dict:
    out = check([python, "-c", USE_INSTALLED], cwd=cwd)
    return json.loads(out.strip().splitlines()[-1])


def assert_works(found: dict, site: pathlib.Path):
    """The installed copy (not the checkout) serves the cpu backend, matching the reference."""
    assert pathlib.Path(found["file"]).is_relative_to(site), found["file"]
    assert pathlib.Path(found["record_path"]).is_relative_to(site)
    assert "cpu" in found["available"], found["status"]
    assert found["cpu_err"] < 1e-10 and found["auto_err"] < 1e-10
    assert found["warnings"] == [] and found["C_loaded"]
    rec = found["record"]
    assert rec["built"] and not rec["cuda"] and rec["reason"] == "CUDA ops not built: MEFN_SKIP_CUDA=1"
    assert rec["torch"] == found["torch"] == torch.__version__


def sdist_needs() -> set:
    """Files of the checkout that a build from the sdist needs, or that the README links to."""
    need = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    for folder, pattern in (("csrc", "**/*"), ("kernels", "**/*.py"), ("mefn_fast", "**/*.py")):
        need |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern)
                 if p.is_file() and "__pycache__" not in p.parts}
    readme = (ROOT / "README.md").read_text()
    need |= {link for link in re.findall(r"\]\(([^)#\s]+)", readme) if (ROOT / link).is_file()}
    return need


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """A wheel of the checkout, the sdist, a wheel of the sdist, and an editable install of the
    unpacked sdist with a fresh venv's pip 23 (setuptools and wheel from this environment). The
    three compiles run at once (one job each)."""
    tmp = tmp_path_factory.mktemp("packaging")
    sdist_dir = tmp / "sdist"
    check([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", sdist_dir, ROOT])
    (sdist,) = sdist_dir.glob("mefn_fast-*.tar.gz")
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name and m.isfile()}
        t.extractall(tmp / "unpacked", filter="data")
    editable_src = next((tmp / "unpacked").iterdir())
    pip23 = make_venv(tmp / "venv-editable")
    check([pip23, "-m", "pip", "uninstall", "-q", "-y", "setuptools"])  # use this environment's
    jobs = {
        "checkout": [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                     "-w", tmp / "wheel-checkout", ROOT],
        "sdist": [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                  "-w", tmp / "wheel-sdist", sdist],
        "editable": [pip23, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", editable_src],
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = dict(zip(jobs, pool.map(lambda cmd: run(cmd, cwd=tmp), jobs.values())))
    for name, p in done.items():
        assert p.returncode == 0, f"{name}: {' '.join(map(str, jobs[name]))}\n{p.stdout[-6000:]}"
    outside = tmp / "elsewhere"
    outside.mkdir()
    return dict(tmp=tmp, sdist_members=members, outside=outside, editable_python=pip23, editable_src=editable_src,
                wheels={k: next((tmp / f"wheel-{k}").glob("*.whl")) for k in ("checkout", "sdist")})


def install_wheel(installs: dict, which: str) -> tuple:
    venv = installs["tmp"] / f"venv-{which}"
    python = make_venv(venv)
    check([python, "-m", "pip", "install", "-q", "--no-deps", installs["wheels"][which]])
    return python, next((venv / "lib").glob("python*/site-packages"))


@pytest.fixture(scope="module")
def checkout_wheel(installs):
    return install_wheel(installs, "checkout")


@pytest.mark.slow
def test_a_wheel_of_the_checkout_works_outside_the_source_tree(installs, checkout_wheel):
    python, site = checkout_wheel
    assert_works(use_installed(python, installs["outside"]), site)


@pytest.mark.slow
def test_info_on_an_installed_wheel_reports_its_build(installs, checkout_wheel):
    python, site = checkout_wheel
    out = check([python, "-m", "mefn_fast.info"], cwd=installs["outside"])
    assert f"mefn_fast {mefn_fast.__version__}  ({site / 'mefn_fast'})" in out
    assert "extension: built, CPU ops only (CUDA ops not built: MEFN_SKIP_CUDA=1)" in out
    assert f"built against torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})" in out
    assert f"record: {site / 'mefn_fast' / '_build_info.json'}" in out and "loads here: yes" in out
    assert re.search(r"^  cpu +available$", out, re.M), out


@pytest.mark.slow
def test_an_installed_build_for_another_torch_is_not_loaded(installs, checkout_wheel):
    """The wheel as if built against another torch release: the compiled ops are disabled, with the
    reason and the fix in info, a warning from auto, and an error for an explicit request."""
    python, site = checkout_wheel
    path = site / "mefn_fast" / "_build_info.json"
    original = path.read_text()
    built = other_series(torch.__version__)
    path.write_text(json.dumps({**json.loads(original), "torch": built}))
    try:
        found = use_installed(python, installs["outside"])
        info = check([python, "-m", "mefn_fast.info"], cwd=installs["outside"])
        direct = run([python, "-c", "import mefn_fast.backends.ext_ops"], cwd=installs["outside"])
    finally:
        path.write_text(original)
    reason = f"mefn_fast._C was built against torch {built} but torch {torch.__version__} is running"
    assert not found["C_loaded"] and "cpu" not in found["available"]
    assert found["status"]["cpu"].startswith(reason) and "--force-reinstall" in found["status"]["cpu"]
    assert reason in found["cpu_error"]
    assert found["auto_err"] < 1e-10 and len(found["warnings"]) == 1 and reason in found["warnings"][0]
    assert f"loads here: no: {reason}" in info
    assert direct.returncode != 0 and f"ImportError: {reason}" in direct.stdout


@pytest.mark.slow
def test_the_sdist_holds_every_file_the_build_needs(installs):
    members = installs["sdist_members"]
    assert sdist_needs() - members == set()
    assert not {m for m in members if m.endswith((".so", ".o", ".pyc")) or m.endswith("_build_info.json")}


@pytest.mark.slow
def test_a_wheel_of_the_sdist_works_outside_the_source_tree(installs):
    python, site = install_wheel(installs, "sdist")
    assert_works(use_installed(python, installs["outside"]), site)


@pytest.mark.slow
def test_an_editable_install_with_pip_23_builds_the_extension(installs):
    """A fresh venv's own pip (23.2 with Python 3.11) without a pyproject.toml ran ``setup.py
    develop``, which setuptools >= 80 hands to an isolated build without torch; with it pip builds
    the editable wheel itself, in this environment."""
    python, src = installs["editable_python"], installs["editable_src"]
    found = use_installed(python, installs["outside"])
    assert pathlib.Path(found["file"]).is_relative_to(src) and found["cpu_err"] < 1e-10
    assert found["record"]["built"] and json.loads((src / "mefn_fast" / "_build_info.json").read_text())["built"]
    kernels = check([python, "-c", "import mefn_fast.kernels as k; print(k.__file__)"], cwd=installs["outside"])
    assert pathlib.Path(kernels.strip().splitlines()[-1]).is_relative_to(src / "kernels")


@pytest.mark.slow
def test_pip_install_without_torch_in_the_build_environment_fails_loudly(tmp_path):
    """Plain ``pip install .`` builds in isolation: it must say what to do, never succeed without
    the extension. With a fresh venv's pip 23 and no torch at all, and with this environment's pip
    (torch installed, but hidden by the isolation)."""
    python = make_venv(tmp_path / "venv-no-torch", with_torch=False)
    fresh = run([python, "-m", "pip", "install", "--no-deps", ROOT], cwd=tmp_path)
    assert fresh.returncode != 0 and NO_TORCH_FIX in fresh.stdout, fresh.stdout[-4000:]
    assert run([python, "-m", "pip", "show", "mefn_fast"]).returncode != 0  # nothing was installed
    here = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "wheels", ROOT], cwd=tmp_path)
    assert here.returncode != 0 and NO_TORCH_FIX in here.stdout, here.stdout[-4000:]
    assert not list(tmp_path.glob("wheels/*.whl"))
