"""Triton kernels of mefn_fast: the repository's ``kernels/`` folder, installed as ``mefn_fast.kernels``.

Part of the op layer: the kernels import Triton and torch only. Importing this package imports
nothing heavy; :mod:`mefn_fast.kernels.xattn_similarity` imports Triton and is imported by
:mod:`mefn_fast.backends.triton` (the custom ops, fake kernels and autograd) when the op first runs.
The math is in ``docs/math.md``, the kernels' design in ``docs/design.md``.
"""

if __name__ == "kernels":
    # Imported by its folder's name, which happens only from the root of a checkout (``python -m``,
    # ``python -c`` or a script there puts the root on sys.path). That name belongs to a PyPI
    # package too, Hugging Face's ``kernels``, which transformers 5 imports: hand the name back to
    # it when it is installed, so that this folder never shadows it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
