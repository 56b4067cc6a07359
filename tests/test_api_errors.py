"""Bad input raises ValueError/TypeError naming the argument, for every backend
that can be asked for on this machine."""
from __future__ import annotations

import math

import pytest
import torch

import mefn_fast
from conftest import make_inputs

BACKENDS = [b for b in mefn_fast.available_backends() if b in ("reference", "cpu")]


def call(backend, regions, rl, words, wl, **kw):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend=backend, **kw)


@pytest.fixture
def good():
    return make_inputs(2, 3, 4, 5, 6, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,exc,name", [
    (lambda r, rl, w, wl: (r[0], rl, w, wl), ValueError, "regions"),
    (lambda r, rl, w, wl: (r, rl, w[..., None], wl), ValueError, "words"),
    (lambda r, rl, w, wl: (r, rl, w[..., :5], wl), ValueError, "feature dimension"),
    (lambda r, rl, w, wl: (r.numpy(), rl, w, wl), TypeError, "regions"),
    (lambda r, rl, w, wl: (r.int(), rl, w, wl), TypeError, "regions"),
    (lambda r, rl, w, wl: (r, rl, w.double(), wl), TypeError, "dtype"),
    (lambda r, rl, w, wl: (r, torch.tensor([0, 4]), w, wl), ValueError, "region_lengths"),
    (lambda r, rl, w, wl: (r, torch.tensor([5, 4]), w, wl), ValueError, "region_lengths"),
    (lambda r, rl, w, wl: (r, rl, w, torch.tensor([1, 6, 2])), ValueError, "word_lengths"),
    (lambda r, rl, w, wl: (r, rl, w, torch.tensor([-1, 2, 2])), ValueError, "word_lengths"),
    (lambda r, rl, w, wl: (r, torch.tensor([4, 4, 4]), w, wl), ValueError, "region_lengths"),
    (lambda r, rl, w, wl: (r, torch.tensor([[4, 4]]), w, wl), ValueError, "region_lengths"),
    (lambda r, rl, w, wl: (r, torch.tensor([4.0, 4.0]), w, wl), TypeError, "region_lengths"),
    (lambda r, rl, w, wl: (r, rl, w, torch.tensor([True, True, True])), TypeError, "word_lengths"),
    (lambda r, rl, w, wl: (r, "4,4", w, wl), TypeError, "region_lengths"),
    (lambda r, rl, w, wl: (r, rl, w.to("meta"), wl), ValueError, "device"),
    (lambda r, rl, w, wl: (r, rl.to("meta"), w, wl), ValueError, "device"),
])
def test_bad_tensors(backend, good, mutate, exc, name):
    with pytest.raises(exc, match=name):
        call(backend, *mutate(*good))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,exc,name", [
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=-1.0), ValueError, "tau"),
    (dict(tau=math.nan), ValueError, "tau"),
    (dict(lambda_t2i=math.inf), ValueError, "lambda_t2i"),
    (dict(lambda_i2t=math.nan), ValueError, "lambda_i2t"),
    (dict(lambda_t2i=-1.0), ValueError, "lambda_t2i"),
    (dict(lambda_lse=0.0), ValueError, "lambda_lse"),
    (dict(lambda_lse=-math.inf), ValueError, "lambda_lse"),
    (dict(tau="0.5"), TypeError, "tau"),
    (dict(direction="x2y"), ValueError, "direction"),
    (dict(attn_norm="l2norm"), ValueError, "attn_norm"),
    (dict(agg="max"), ValueError, "agg"),
    (dict(mfe="yes"), TypeError, "mfe"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_options(backend, good, kw, exc, name):
    with pytest.raises(exc, match=name):
        call(backend, *good, **kw)


def test_unknown_backend(good):
    with pytest.raises(ValueError, match="backend"):
        call("tpu", *good)
    with pytest.raises(TypeError, match="backend"):
        call(3, *good)


def test_unavailable_backend_says_why(good):
    status = mefn_fast.backend_status()
    missing = [name for name, reason in status.items() if reason is not None]
    for name in missing:
        with pytest.raises(ValueError, match=name):
            call(name, *good)
    # a GPU backend never takes CPU tensors, whether or not it is available
    with pytest.raises(ValueError, match="cuda"):
        call("cuda", *good)


def test_lengths_as_python_lists(good):
    r, rl, w, wl = good
    torch.testing.assert_close(call("reference", r, rl.tolist(), w, wl.tolist()), call("reference", r, rl, w, wl))
    torch.testing.assert_close(call("reference", r, None, w, None),
                               call("reference", r, torch.full((2,), 4), w, torch.full((3,), 5)))


def test_entropy_map_bad_input():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="regions_i"):
        mefn_fast.entropy_map(x[None], x)
    with pytest.raises(ValueError, match="direction"):
        mefn_fast.entropy_map(x, x, direction="both")
    with pytest.raises(ValueError, match="word_lengths"):
        mefn_fast.entropy_map(x, x, word_length=5)
    with pytest.raises(TypeError, match="words_t"):
        mefn_fast.entropy_map(x, [1, 2])
