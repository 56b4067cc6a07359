"""``python -m mefn_fast.info``: versions, the extension build, and every backend with the reason
it is unavailable, if it is."""
from __future__ import annotations

import os
import platform

import torch

import mefn_fast
from mefn_fast.backends import BACKENDS, backend_status
from mefn_fast.backends.build import RECORD_PATH, build_info, extension_problem


def extension_lines(b: dict) -> list:
    """The build record ``b`` in words: what was built, against what, and whether it loads here."""
    what = "built with CUDA ops" if b.get("cuda") else "built, CPU ops only" if b.get("built") else "not built"
    lines = [f"extension: {what}" + (f" ({b['reason']})" if b.get("reason") else "")]
    if b.get("built"):
        cuda = (f"CUDA {b.get('cuda_toolkit') or '?'} for sm {', '.join(b.get('cuda_archs') or ())}, "
                if b.get("cuda") else "")
        lines.append(f"  built against torch {b.get('torch')} (CUDA build: {b.get('torch_cuda') or 'no'}), "
                     f"{cuda}{b.get('compiler')}, python {b.get('python')} on {b.get('platform')}")
    problem = extension_problem(b)
    lines.append(f"  record: {RECORD_PATH}" if os.path.exists(RECORD_PATH) else "  record: none")
    if b.get("built"):
        lines.append(f"  loads here: {'yes' if problem is None else 'no: ' + problem}")
    return lines


def report() -> str:
    lines = [
        f"mefn_fast {mefn_fast.__version__}  ({os.path.dirname(mefn_fast.__file__)})",
        f"python {platform.python_version()}  torch {torch.__version__}  (CUDA build: {torch.version.cuda or 'no'})",
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    except ImportError:
        lines.append("triton: not installed")
    lines += extension_lines(build_info())
    lines.append("")
    lines.append("backends (in 'auto' preference order):")
    for name, reason in backend_status().items():
        b = BACKENDS[name]
        state = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name:<10} {state}")
        lines.append(f"  {'':<10} {b.description}; devices: {', '.join(b.devices)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
