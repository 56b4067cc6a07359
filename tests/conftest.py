"""Shared fixtures: seeded ragged inputs and the option grid of the similarity (docs/math.md)."""
from __future__ import annotations

import itertools

import pytest
import torch

# Every combination of the section-2 switches; hyper-parameters away from the defaults where a
# default could hide a bug (e.g. a lambda mixed up between directions).
OPTION_GRID = [
    dict(direction=direction, attn_norm=attn_norm, mfe=mfe, agg=agg, lambda_t2i=7.0, lambda_i2t=3.0,
         tau=0.4, lambda_lse=5.0)
    for direction, attn_norm, mfe, agg in itertools.product(
        ("t2i", "i2t", "both"), ("clipped_l2norm", "none"), (True, False), ("mean", "lse"))
]


def option_id(opts: dict) -> str:
    return f"{opts['direction']}-{opts['attn_norm']}-{'mfe' if opts['mfe'] else 'nomfe'}-{opts['agg']}"


def make_inputs(b_img=3, b_txt=4, n=7, m=5, d=11, dtype=torch.float64, seed=0, ragged=True,
                device="cpu", requires_grad=False):
    """Random regions/words with ragged lengths that include 1 and the full length."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b_img, n, d, generator=g, dtype=torch.float64)
    words = torch.randn(b_txt, m, d, generator=g, dtype=torch.float64)
    if ragged:
        rl = torch.randint(1, n + 1, (b_img,), generator=g)
        wl = torch.randint(1, m + 1, (b_txt,), generator=g)
        rl[0], wl[0] = n, m
        if b_img > 1:
            rl[1] = 1
        if b_txt > 1:
            wl[1] = 1
    else:
        rl = torch.full((b_img,), n)
        wl = torch.full((b_txt,), m)
    regions = regions.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    words = words.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return regions, rl.to(device), words, wl.to(device)


def ref_scores(regions, rl, words, wl, **opts):
    """The reference backend's scores with the similarity's options given as keywords."""
    from mefn_fast.options import make_options
    from mefn_fast.backends.reference import xattn_similarity_reference

    return xattn_similarity_reference(regions, rl, words, wl, make_options(**opts))


def scores_with_grads(fn, regions, rl, words, wl, weight, opts, grad=True):
    """fn's scores on fresh leaf copies of the features and, with grad, the gradients of
    sum(scores * weight) to regions and words (None, None without)."""
    r = regions.detach().clone().requires_grad_(grad)
    w = words.detach().clone().requires_grad_(grad)
    s = fn(r, rl, w, wl, **opts)
    if not grad:
        return s.detach(), None, None
    dr, dw = torch.autograd.grad((s * weight.to(device=s.device, dtype=s.dtype)).sum(), (r, w))
    return s.detach(), dr, dw


def max_abs_err(a, b) -> float:
    """max |a - b| in float64 on the CPU (0 for empty tensors)."""
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and far faster than on two on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels under TRITON_INTERPRET=1 (slow)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture
def rng_inputs():
    return make_inputs
