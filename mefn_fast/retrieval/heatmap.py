"""The paper's Figure 2: the region x word entropy map of one image-caption pair.

:func:`draw_entropy_map` draws, for one pair, the cell entropies h = -A log A (context rows x
query columns), the attention A, the query entropies H and the MFE weights w, with the words as
column labels, to a PNG. The numbers are exactly those of :func:`mefn_fast.entropy_map`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..api import EntropyMap


def draw_entropy_map(maps: EntropyMap, path: str, query_labels: Optional[Sequence[str]] = None,
                     context_labels: Optional[Sequence[str]] = None, title: str = "", dpi: int = 100) -> str:
    """Write a PNG with four panels (h, A, H, w) of one pair's :class:`~mefn_fast.EntropyMap`.

    ``query_labels`` label the columns (the words for t2i), ``context_labels`` the rows (the
    regions for t2i; default r0, r1, ...). Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = maps.h.detach().double().cpu().numpy()
    A = maps.A.detach().double().cpu().numpy()
    H = maps.H.detach().double().cpu().numpy()
    w = maps.w.detach().double().cpu().numpy()
    n, m = h.shape
    cols = list(query_labels) if query_labels is not None else [f"q{k}" for k in range(m)]
    rows = list(context_labels) if context_labels is not None else [f"r{r}" for r in range(n)]
    if len(cols) != m or len(rows) != n:
        raise ValueError(f"labels must match the map's shape {n} x {m}; got {len(rows)} row and {len(cols)} column labels")

    width = max(6.0, 0.45 * m + 3.0)
    height = max(5.0, 0.22 * n + 3.5)
    fig, axes = plt.subplots(2, 2, figsize=(2 * width, height),
                             gridspec_kw=dict(height_ratios=[max(n, 4), 2.5]), squeeze=False)
    for ax, data, name, cmap in ((axes[0][0], h, "cell entropy h = -A log A", "magma"),
                                 (axes[0][1], A, "attention A", "viridis")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks(range(m), cols, rotation=60, ha="right", fontsize=9)
        ax.set_yticks(range(n), rows, fontsize=7 if n > 20 else 9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax, data, name in ((axes[1][0], H, f"query entropy H (MFE = {float(maps.MFE):.3f})"),
                           (axes[1][1], w, "MFE weight w")):
        ax.bar(range(m), data, color="tab:blue")
        ax.set_title(name)
        ax.set_xticks(range(m), cols, rotation=60, ha="right", fontsize=9)
        ax.set_xlim(-0.5, m - 0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
