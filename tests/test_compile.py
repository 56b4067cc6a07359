"""``torch.compile``: ``xattn_similarity`` and ``MEFN.similarity`` trace with ``fullgraph=True`` on
every backend, and a whole training step (text encoder, both branches, loss) has no graph break.

Each function is compiled with ``fullgraph=True`` through a backend that counts the graphs dynamo
makes (one: no graph break) and runs them with ``aot_eager`` (dynamo and AOTAutograd, no code
generation: fast); the compiled function must equal eager mode, forward and gradients. The Triton backend is traced on CPU tensors under the interpreter
(its registry entry is pointed at the CPU for the test); the cuda backend needs a GPU.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():  # the same switch as test_xattn_similarity_triton.py, before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mefn_fast  # noqa: E402
from conftest import make_inputs  # noqa: E402
from mefn_fast import backends  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

transformers = pytest.importorskip("transformers")
OPTIONS = dict(direction="both", mfe=True, agg="lse", lambda_t2i=7.0, tau=0.4)


def compiled_equals_eager(fn, *leaves_and_rest, n_leaves: int, exact: bool = False, params=()) -> int:
    """fn compiled with fullgraph=True gives eager's output and gradients (to the first n_leaves
    args and to ``params``); returns the number of graphs dynamo made of it (1: no graph break)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    results = []
    for f in (fn, compiled):
        leaves = [x.detach().clone().requires_grad_(True) for x in leaves_and_rest[:n_leaves]]
        for p in params:
            p.grad = None
        out = f(*leaves, *leaves_and_rest[n_leaves:])
        out.sum().backward()
        results.append((out.detach(), [x.grad for x in leaves] + [p.grad for p in params]))
    (eager, eager_grads), (comp, comp_grads) = results
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-12, atol=1e-15)
    for a, b in zip([comp, *comp_grads], [eager, *eager_grads]):
        torch.testing.assert_close(a, b, **tol)
    return counter.frame_count


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The registry's triton entry pointed at CPU tensors (the interpreter runs the kernels)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        yield "triton"
        return
    from mefn_fast.backends import triton as tb

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    monkeypatch.setitem(backends.BACKENDS, "triton",
                        dataclasses.replace(backends.BACKENDS["triton"], devices=("cpu",)))
    monkeypatch.setitem(backends._LOADED, "triton", (tb.xattn_similarity_triton, tb.input_limits, None))
    monkeypatch.setattr(backends, "_chosen", {})
    yield "triton"


def _backend_cases():
    return ["reference", "cpu", "triton", "cuda"]


@pytest.mark.parametrize("backend", _backend_cases())
def test_xattn_similarity_has_no_graph_break(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_on_cpu")
    elif backend not in mefn_fast.available_backends():
        pytest.skip(f"{backend}: {mefn_fast.backend_status()[backend]}")
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 8, dtype=dtype, device=device)

    def f(regions, words, rl, wl):
        return mefn_fast.xattn_similarity(regions, rl, words, wl, backend=backend, **OPTIONS)

    # float64 through the reference and cpu backends; the float32 kernels run the same op either way
    assert compiled_equals_eager(f, regions, words, rl, wl, n_leaves=2, exact=dtype == torch.float32) == 1


def test_auto_backend_and_python_lengths_compile_without_graph_break():
    regions, rl, words, wl = make_inputs(2, 3, 6, 4, 8, dtype=torch.float64)
    lengths = rl.tolist()  # a list of ints is a constant of the graph
    e = torch._dynamo.explain(lambda r, w, wl: mefn_fast.xattn_similarity(r, lengths, w, wl))(regions, words, wl)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason) for b in e.break_reasons]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_calls_still_reject_lengths_out_of_range(backend):
    """Under compile the range is not read in Python (a graph break): CPU lengths are checked inside
    the graph, and the C++ ops check theirs when they run."""
    if backend not in mefn_fast.available_backends():
        pytest.skip(f"{backend}: {mefn_fast.backend_status()[backend]}")
    regions, rl, words, wl = make_inputs(2, 3, 6, 4, 8, dtype=torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda r, rl, w, wl: mefn_fast.xattn_similarity(r, rl, w, wl, backend=backend),
                      fullgraph=True, backend="aot_eager")
    f(regions, rl, words, wl)
    with pytest.raises(RuntimeError, match=r"word_lengths must lie in \[1, 4\]"):
        f(regions, rl, words, torch.tensor([1, 9, 2]))
    with pytest.raises(RuntimeError, match=r"region_lengths must lie in \[1, 6\]"):
        f(regions, torch.tensor([0, 1]), words, wl)


def test_the_triton_op_checks_the_lengths_when_it_runs(triton_on_cpu):
    from mefn_fast.backends import triton as tb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    regions, rl, words, wl = make_inputs(2, 3, 6, 4, 8, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match=r"word_lengths must lie in \[1, 4\]"):
        tb.xattn_similarity_op(regions, rl, words, torch.tensor([1, 5, 2], device=device), "t2i", 9.0, 4.0, "clipped_l2norm",
                               True, 0.25, "mean", 6.0)


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    return mefn_fast.MEFN(text_encoder=cfg, region_dim=20, embed_dim=16, **kw)


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 5, 20, generator=g, dtype=torch.float64)
    ids = torch.randint(5, 60, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return feats, torch.tensor([5, 2, 4, 3]), ids, mask


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_similarity_compiles_as_one_graph(backend):
    if backend not in mefn_fast.available_backends():
        pytest.skip(f"{backend}: {mefn_fast.backend_status()[backend]}")
    model = tiny_model(backend=backend).double()
    feats, rl, ids, mask = tiny_batch()
    img, txt = model.encode_images(feats, rl), model.encode_texts(ids, mask)

    def sim(regions, words, global_, cls, rl, wl):
        return model.similarity(mefn_fast.ImageEmbeddings(regions, rl, global_), mefn_fast.TextEmbeddings(words, wl, cls))

    assert compiled_equals_eager(sim, img.regions, txt.words, img.global_, txt.cls, img.lengths, txt.lengths,
                                 n_leaves=4) == 1


def test_a_training_step_has_no_graph_break():
    """Text encoder, image projection, both branches and the loss: one graph (0 graph breaks)."""
    model = tiny_model().double().eval()  # eval: no dropout, so that compiled == eager
    loss_fn = mefn_fast.TripletLoss()

    def step(feats, rl, ids, mask, image_ids):
        return loss_fn(model(feats, ids, mask, region_lengths=rl), image_ids)

    feats, rl, ids, mask = tiny_batch()
    params = list(model.parameters())
    assert compiled_equals_eager(step, feats, rl, ids, mask, torch.tensor([0, 1, 1, 2]), n_leaves=1,
                                 params=params) == 1
    assert all(p.grad is not None for p in params)  # every parameter gets its gradient from the compiled step
