"""``python -m mefn_fast.info``: versions, the extension build, and every backend with the reason
it is unavailable, if it is."""
from __future__ import annotations

import os
import platform

import torch

import mefn_fast
from mefn_fast.backends import BACKENDS, backend_status
from mefn_fast.backends.build import build_info


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
    b = build_info()
    lines.append(f"extension: {'built' if b.get('built') else 'not built'}"
                 f"{' with CUDA' if b.get('cuda') else ''}" + (f" ({b['reason']})" if b.get("reason") else ""))
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
