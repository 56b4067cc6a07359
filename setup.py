"""Build and install mefn_fast.

    pip install --no-build-isolation -e .          # torch must already be installed

The C++ extension (``mefn_fast._C``: CPU ops, and CUDA ops when a CUDA toolkit and a CUDA build of
torch are present) is built from ``csrc/``. When it cannot be built the package still installs and
imports, and ``python -m mefn_fast.info`` says why the compiled backends are missing.

Environment switches (flash-attention style):
    MEFN_SKIP_EXT=1       build no extension at all (the reference and Triton backends still work)
    MEFN_FORCE_CUDA=1     build the CUDA sources even if no toolkit/GPU is detected (fail loudly)
    MEFN_SKIP_CUDA=1      build the CPU ops only
    MEFN_CUDA_ARCHS       semicolon list of compute capabilities, default "8.0;9.0"
    MAX_JOBS              parallel compile jobs (ninja)
    DEBUG=1               -O0 -g
"""
import glob
import json
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "mefn_fast", "_build_info.json")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _write_build_info(**info) -> None:
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)


def extension_setup() -> dict:
    """ext_modules and cmdclass for the C++/CUDA extension, or {} when there is nothing to build.

    A failed build is reported (in ``mefn_fast/_build_info.json``, read by ``mefn_fast.info``)
    instead of failing the install, unless MEFN_FORCE_CUDA=1 asked for it explicitly.
    """
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if _flag("MEFN_SKIP_EXT"):
        _write_build_info(built=False, cuda=False, reason="skipped: MEFN_SKIP_EXT=1 at install time")
        return {}
    if not cpp_sources:
        _write_build_info(built=False, cuda=False, reason="no C++ sources in csrc/")
        return {}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would guess /usr/local from a wrapper nvcc
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _write_build_info(built=False, cuda=False, reason=f"torch not importable at build time: {e}")
        return {}

    force_cuda, skip_cuda = _flag("MEFN_FORCE_CUDA"), _flag("MEFN_SKIP_CUDA")
    cuda_ok = bool(cu_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = force_cuda or (cuda_ok and not skip_cuda)
    debug = _flag("DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # no -std flag: torch's cpp_extension adds the standard its headers need (C++20 since torch 2.10)
    cxx_flags += ["-fopenmp"] if sys.platform != "win32" else []
    define_macros = []
    kwargs = dict(extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])
    sources = list(cpp_sources)
    if build_cuda:
        archs = os.environ.get("MEFN_CUDA_ARCHS", "8.0;9.0")
        # no --use_fast_math: the per-pair epilogue (csrc/xattn_pair.h) is checked against the float64
        # reference at a small multiple of the reference's own error; approximate expf/logf/division
        # (several ulps, growing with |x|) would eat that margin
        nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        for arch in archs.replace(",", ";").split(";"):
            cc = arch.strip().replace(".", "")
            if cc:
                nvcc_flags += [f"-gencode=arch=compute_{cc},code=sm_{cc}"]
        sources += cu_sources
        define_macros.append(("MEFN_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "mefn_fast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(
            "mefn_fast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, **kwargs)
    why_no_cuda = (
        "MEFN_SKIP_CUDA=1" if skip_cuda else
        "no CUDA sources" if not cu_sources else
        "torch is a CPU-only build" if torch.version.cuda is None else
        "no CUDA toolkit found (set CUDA_HOME)" if cpp_extension.CUDA_HOME is None else None)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # keep the package installable; info says why
                if force_cuda:
                    raise
                if build_cuda and self._build_cpu_only(extension, e):
                    return
                print(f"WARNING: building {extension.name} failed; compiled backends disabled: {e}", file=sys.stderr)
                _write_build_info(built=False, cuda=False, reason=f"extension build failed: {e}")
                # drop it from the outputs, or the (editable) install fails copying a missing .so
                if extension in self.extensions:
                    self.extensions.remove(extension)
                return
            _write_build_info(built=True, cuda=build_cuda, torch=torch.__version__,
                              reason=None if build_cuda else f"CUDA ops not built: {why_no_cuda}")

        def _build_cpu_only(self, extension, cuda_error) -> bool:
            """After a failed CUDA build, keep the CPU ops: rebuild from the C++ sources alone."""
            print(f"WARNING: the CUDA sources of {extension.name} failed to build ({cuda_error}); "
                  "retrying with the CPU ops only", file=sys.stderr)
            extension.sources = list(cpp_sources)
            extension.define_macros = [m for m in extension.define_macros if m[0] != "MEFN_WITH_CUDA"]
            extension.extra_compile_args = {"cxx": cxx_flags}
            try:
                super().build_extension(extension)
            except Exception:
                return False
            _write_build_info(built=True, cuda=False, torch=torch.__version__,
                              reason=f"CUDA ops failed to build: {cuda_error}")
            return True

    return dict(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)})


setup(
    name="mefn_fast",
    version="0.1.0",
    description="Fused CPU/Triton/CUDA kernels for MEFN's entropy-aware cross-attention image-text similarity",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    # The Triton kernels live in the repository's top-level kernels/ folder and install as
    # mefn_fast.kernels, beside csrc/ (C++/CUDA) and mefn_fast/ (Python).
    packages=find_packages(include=["mefn_fast", "mefn_fast.*"]) + ["mefn_fast.kernels"],
    package_dir={"mefn_fast.kernels": "kernels"},
    package_data={"mefn_fast": ["_build_info.json", "py.typed"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "train": ["transformers>=4.40", "timm>=0.9", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "ninja"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mefn-fast=mefn_fast.cli:main"]},
    **extension_setup(),
)
