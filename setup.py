"""Build and install mefn_fast and its compiled extension ``mefn_fast._C`` (C++ CPU ops, and CUDA
ops when a CUDA toolkit and a CUDA build of torch are present; sources in ``csrc/``).

The extension is compiled against the torch of the environment that builds it, so torch is
installed first and pip must build in that environment:

    pip install torch                              # any release >= 2.6
    pip install --no-build-isolation .             # or -e . for development

Plain ``pip install .`` builds in an isolated environment without torch: it stops with that advice
instead of installing a package without its compiled backends (``pyproject.toml`` says why torch
is not a build requirement). Every other failure to build what was asked for stops the install
too, saying what to do: sources missing from the tree or sdist, a compiler error. Two exceptions,
both visible in ``python -m mefn_fast.info``: ``MEFN_SKIP_EXT=1`` installs without the extension
on purpose, and a failed CUDA compile falls back to the CPU ops with a warning (``pip install -v``
shows it).

The build record ``_build_info.json`` (what was built, with which torch, CUDA and compiler) is
written into the built package before anything is copied from it, so a wheel, a site-packages
install and an editable install each report their own build; ``mefn_fast/backends/build.py``
reads it and refuses to load ``_C`` into a torch whose C++ ABI may differ.

Environment switches (flash-attention style):
    MEFN_SKIP_EXT=1       build no extension at all (the reference and Triton backends still work)
    MEFN_FORCE_CUDA=1     build the CUDA sources even if no toolkit/GPU is detected, and fail the
                          install if they do not compile
    MEFN_SKIP_CUDA=1      build the CPU ops only
    MEFN_CUDA_ARCHS       semicolon list of compute capabilities, default "8.0;9.0"
    MAX_JOBS              parallel compile jobs (ninja)
    DEBUG=1               -O0 -g
"""
import glob
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "mefn_fast._C"
RECORD_NAME = "_build_info.json"  # in the mefn_fast package; read by mefn_fast/backends/build.py
MIN_TORCH = "2.6"
INSTALL_HINT = "pip install --no-build-isolation ."
SKIP_HINT = "MEFN_SKIP_EXT=1 pip install . installs the package without its compiled cpu and cuda backends"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _fail(what: str, *advice: str) -> SetupError:
    """The error that stops the install: what went wrong, then what to do."""
    return SetupError("\n".join([f"mefn_fast: {what}", *(f"  {line}" for line in advice)]))


# ------------------------------------------------------------------------------------------------
# Sources


def _rel(*parts: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, *parts)))


CPP_SOURCES = _rel("csrc", "*.cpp")
CU_SOURCES = _rel("csrc", "cuda", "*.cu")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def missing_sources(sources: list) -> list:
    """What the build of ``sources`` needs and the tree lacks: no C++ source at all, or a quoted
    ``#include`` (followed recursively, relative to the including file) that is not on disk."""
    if not any(s.endswith(".cpp") for s in sources):
        return ["csrc/*.cpp (the CPU op)"]
    missing, seen, todo = [], set(), list(sources)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for name in _INCLUDE.findall(text):
            target = os.path.normpath(os.path.join(os.path.dirname(path), name))
            if os.path.exists(os.path.join(ROOT, target)):
                todo.append(target)
            else:
                missing.append(f"{target} (included by {path})")
    return missing


def _check_sources(sources: list) -> None:
    missing = missing_sources(sources)
    if missing:
        raise _fail(f"the extension's sources are incomplete; missing: {', '.join(missing)}.",
                    "Build from a full checkout, or from an sdist made by `python -m build --sdist` "
                    "(MANIFEST.in carries csrc/ whole).", f"Or: {SKIP_HINT}.")


# ------------------------------------------------------------------------------------------------
# The build record


def _output(cmd: list) -> str:
    """What ``cmd`` prints, or "" when it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _compiler() -> str:
    compiler = os.environ.get("CXX", "c++")
    lines = _output([compiler, "--version"]).strip().splitlines()
    return f"{compiler}: {lines[0].strip() if lines else 'version unknown'}"


def _nvcc_release(cuda_home):
    m = re.search(r"release (\d+\.\d+)", _output([os.path.join(cuda_home, "bin", "nvcc"), "--version"])) if cuda_home else None
    return m.group(1) if m else None


def _write_record(cmd, record: dict, in_place: bool) -> list:
    """Write ``record`` into the package being built (``build_lib/mefn_fast``, which the wheel or
    the install copies) and, for in-place and editable builds, into the source package that the
    install points at. Returns the paths written."""
    folders = [os.path.join(cmd.build_lib, "mefn_fast")]
    if in_place:
        folders.append(os.path.abspath(cmd.get_finalized_command("build_py").get_package_dir("mefn_fast")))
    paths = []
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, RECORD_NAME)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        paths.append(path)
    return paths


class RecordOnlyBuildPy(build_py):
    """build_py for MEFN_SKIP_EXT=1: records that no extension was built, and why."""

    def run(self):
        super().run()
        for stale in glob.glob(os.path.join(self.build_lib, "mefn_fast", "_C.*")):  # from an earlier build
            os.remove(stale)
        _write_record(self, {"built": False, "cuda": False, "reason": "skipped: MEFN_SKIP_EXT=1 at install time"},
                      in_place=self.editable_mode)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, "mefn_fast", RECORD_NAME)]


def no_torch_build_ext(error: str):
    """build_ext when torch does not import in the build environment: stop, saying what to do."""

    class NoTorchBuildExt(build_ext):
        def run(self):
            _check_sources(CPP_SOURCES + CU_SOURCES)
            raise _fail(f"torch is not importable in the build environment ({error}), so the C++ "
                        "extension cannot be built.",
                        "pip builds in an isolated environment by default, which does not see an installed torch.",
                        f"Fix: install torch first, then {INSTALL_HINT}  (or -e . for development)",
                        f"Or: {SKIP_HINT}.")

    return NoTorchBuildExt


# ------------------------------------------------------------------------------------------------
# The extension


def torch_extension_setup(torch, cpp_extension) -> dict:
    """ext_modules and the build_ext command of the C++/CUDA extension, built against ``torch``."""
    release = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    force_cuda, skip_cuda, debug = _flag("MEFN_FORCE_CUDA"), _flag("MEFN_SKIP_CUDA"), _flag("DEBUG")
    cuda_ok = bool(CU_SOURCES) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = force_cuda or (cuda_ok and not skip_cuda)
    why_no_cuda = (
        "MEFN_SKIP_CUDA=1" if skip_cuda else
        "no CUDA sources in csrc/cuda/" if not CU_SOURCES else
        "torch is a CPU-only build" if torch.version.cuda is None else
        "no CUDA toolkit found (set CUDA_HOME)" if cpp_extension.CUDA_HOME is None else None)
    archs = [a.strip() for a in os.environ.get("MEFN_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()]

    # no -std flag: torch's cpp_extension adds the standard its headers need (C++20 since torch 2.10)
    cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + (["-fopenmp"] if sys.platform != "win32" else [])
    link_args = ["-fopenmp"] if sys.platform != "win32" else []
    if build_cuda:
        # no --use_fast_math: the per-pair epilogue (csrc/xattn_pair.h) is checked against the float64
        # reference at a small multiple of the reference's own error; approximate expf/logf/division
        # (several ulps, growing with |x|) would eat that margin
        nvcc_flags = (["-O0", "-G"] if debug else ["-O3", "-lineinfo"]) + ["--expt-relaxed-constexpr"]
        nvcc_flags += [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in (a.replace(".", "") for a in archs)]
        ext = cpp_extension.CUDAExtension(
            EXT_NAME, CPP_SOURCES + CU_SOURCES, define_macros=[("MEFN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_args)
    else:
        ext = cpp_extension.CppExtension(EXT_NAME, CPP_SOURCES, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_args)

    def record(cuda: bool, reason) -> dict:
        return {
            "built": True, "cuda": cuda, "reason": reason,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "cuda_toolkit": _nvcc_release(cpp_extension.CUDA_HOME) if cuda else None,
            "cuda_archs": archs if cuda else None,
            "compiler": _compiler(),
            "python": platform.python_version(), "platform": sysconfig.get_platform(),
        }

    class BuildExt(cpp_extension.BuildExtension):
        """Builds the extension or stops the install saying why; a failed CUDA compile falls back
        to the CPU ops (unless MEFN_FORCE_CUDA=1). Writes the build record when done."""

        def finalize_options(self):
            super().finalize_options()
            self.force = True  # relink every time: never keep a library built against an earlier torch

        def run(self):
            _check_sources(list(ext.sources))
            if release < tuple(map(int, MIN_TORCH.split("."))):
                raise _fail(f"torch {torch.__version__} is older than {MIN_TORCH}, the oldest release the "
                            "extension supports.", f"Fix: pip install 'torch>={MIN_TORCH}', then {INSTALL_HINT}")
            self._record = record(build_cuda, None if build_cuda else f"CUDA ops not built: {why_no_cuda}")
            super().run()
            _write_record(self, self._record, in_place=self.inplace)

        def get_outputs(self):
            return super().get_outputs() + [os.path.join(self.build_lib, "mefn_fast", RECORD_NAME)]

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
                return
            except Exception as e:
                error = e
            if not build_cuda or force_cuda:
                raise _fail(f"compiling {extension.name} failed: {error}",
                            "The compiler's messages are above (torch's headers need C++17, and C++20 "
                            "from torch 2.10 on).", f"Or: {SKIP_HINT}.") from error
            print(f"WARNING: mefn_fast: the CUDA sources of {extension.name} failed to compile ({error}); "
                  "building the CPU ops only (MEFN_FORCE_CUDA=1 makes this an error)", file=sys.stderr)
            extension.sources = list(CPP_SOURCES)
            extension.define_macros = [m for m in extension.define_macros if m[0] != "MEFN_WITH_CUDA"]
            extension.extra_compile_args = {"cxx": cxx_flags}
            try:
                super().build_extension(extension)
            except Exception as e:
                raise _fail(f"compiling {extension.name} failed, with and without its CUDA sources: {e}",
                            "The compiler's messages are above.", f"Or: {SKIP_HINT}.") from e
            self._record = record(False, f"CUDA ops failed to build: {error}")

    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})


def extension_setup() -> dict:
    """The setup() arguments that build (or explicitly skip) the extension."""
    if _flag("MEFN_SKIP_EXT"):
        return dict(cmdclass={"build_py": RecordOnlyBuildPy})
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would guess /usr/local from a wrapper nvcc
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        # a stand-in extension keeps the wheel platform-specific and makes build_ext run, and fail
        return dict(ext_modules=[Extension(EXT_NAME, CPP_SOURCES)],
                    cmdclass={"build_ext": no_torch_build_ext(f"{type(e).__name__}: {e}")})
    return torch_extension_setup(torch, cpp_extension)


README = os.path.join(ROOT, "README.md")

setup(
    name="mefn_fast",
    version="0.1.0",
    description="Fused CPU/Triton/CUDA kernels for MEFN's entropy-aware cross-attention image-text similarity",
    long_description=open(README).read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    # The Triton kernels live in the repository's top-level kernels/ folder and install as
    # mefn_fast.kernels, beside csrc/ (C++/CUDA) and mefn_fast/ (Python).
    packages=find_packages(include=["mefn_fast", "mefn_fast.*"]) + ["mefn_fast.kernels"],
    package_dir={"mefn_fast.kernels": "kernels"},
    # The build record is written into the built package by the build commands, never copied
    # from the source tree (where an earlier in-place build may have left one).
    include_package_data=False,
    exclude_package_data={"mefn_fast": [RECORD_NAME]},
    package_data={"mefn_fast": ["py.typed"]},  # PEP 561: the package ships type hints
    python_requires=">=3.9",
    install_requires=[f"torch>={MIN_TORCH}", "numpy"],
    extras_require={
        "train": ["transformers>=4.40", "timm>=0.9", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "ninja", "build"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mefn-fast=mefn_fast.cli:main"]},
    **extension_setup(),
)
