"""The package's layers: a module imports only from its own layer and the ones below it.

1. the op (``api``, ``options``, ``_validate``, ``backends/``, ``kernels/``, ``compat/``, ``_C``);
2. the model (``model/``, and the package root, which exports the op and the model);
3. the applications (``retrieval/``, ``bench/``, ``demo``, ``info``, ``cli``).

The imports are read from the source with ``ast`` (module level and inside functions alike), so a
lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OP, MODEL, APP = 0, 1, 2
LAYER_NAMES = {OP: "op", MODEL: "model", APP: "applications"}
# Longest prefix wins; every module of the package must match one.
LAYER_OF_PREFIX = {
    "mefn_fast.api": OP, "mefn_fast.options": OP, "mefn_fast._validate": OP, "mefn_fast.backends": OP,
    "mefn_fast.kernels": OP, "mefn_fast.compat": OP, "mefn_fast._C": OP,
    "mefn_fast": MODEL, "mefn_fast.model": MODEL,
    "mefn_fast.retrieval": APP, "mefn_fast.bench": APP, "mefn_fast.demo": APP, "mefn_fast.info": APP,
    "mefn_fast.cli": APP,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER_OF_PREFIX:
            return LAYER_OF_PREFIX[prefix]
    raise KeyError(module)


def package_modules() -> dict[str, pathlib.Path]:
    """Module name -> source file, for mefn_fast/ and the top-level kernels/ (installed as mefn_fast.kernels)."""
    out = {}
    for base, package in ((ROOT / "mefn_fast", "mefn_fast"), (ROOT / "kernels", "mefn_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = path
    return out


def imported_modules(source: str, module: str, is_package: bool, known: set) -> list[tuple[int, str]]:
    """(line, module) of every mefn_fast module that ``source`` (the text of ``module``) imports."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mefn_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mefn_fast":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known or sub == "mefn_fast._C" else target))
    return found


def violations(modules: dict[str, pathlib.Path]) -> list[str]:
    known = set(modules)
    out = []
    for module, path in modules.items():
        mine = layer_of(module)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py", known):
            if layer_of(target) > mine:
                out.append(f"{path.name}:{line}: {module} ({LAYER_NAMES[mine]}) imports {target} "
                           f"({LAYER_NAMES[layer_of(target)]})")
    return out


def test_every_module_has_a_layer():
    modules = package_modules()
    assert "mefn_fast.kernels.xattn_similarity" in modules and "mefn_fast.backends.reference" in modules
    for module in modules:
        layer_of(module)  # raises KeyError for a module outside the map


def test_lower_layers_never_import_higher_ones():
    assert violations(package_modules()) == []


@pytest.mark.parametrize("module,source,bad", [
    ("mefn_fast.backends.cpu", "from ..retrieval import train\n", True),
    ("mefn_fast.api", "def f():\n    from mefn_fast.model import MEFN\n", True),
    ("mefn_fast.backends.ext_ops", "import mefn_fast\n", True),  # the root exports the model layer
    ("mefn_fast.model.mefn", "from ..cli import main\n", True),
    ("mefn_fast.backends.ext_ops", "from .. import _C\nfrom ..options import XAttnOptions\n", False),
    ("mefn_fast.retrieval.train", "from ..model import MEFN\nfrom ..api import xattn_similarity\n", False),
])
def test_the_checker_sees_a_violation(tmp_path, module, source, bad):
    """The same check on a stand-in for one module's source: it must catch each upward import."""
    stand_in = tmp_path / (module.rpartition(".")[2] + ".py")
    stand_in.write_text(source)
    modules = {**package_modules(), module: stand_in}
    found = [v for v in violations(modules) if f" {module} (" in v]
    assert bool(found) == bad, found
