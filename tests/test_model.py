"""mefn_fast.MEFN: encoders, branches, ablation switches, save/load."""
from __future__ import annotations

import pytest
import torch

import mefn_fast
from mefn_fast.model import MEFN

transformers = pytest.importorskip("transformers")


def tiny_bert():
    return transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)


def batch(b_img=3, b_txt=4, n=5, f=20, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b_img, n, f, generator=g)
    ids = torch.randint(5, 60, (b_txt, length), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(b_txt, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0  # [CLS] w [SEP]: one word
    return feats, torch.tensor([5, 2, 4][:b_img]), ids, mask


def make(**kw):
    torch.manual_seed(0)
    args = dict(embed_dim=16, region_dim=20, text_encoder=tiny_bert())
    args.update(kw)
    return MEFN(**args)


def test_forward_backward_precomputed_regions():
    model = make()
    feats, rl, ids, mask = batch()
    scores = model(feats, ids, mask, region_lengths=rl)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    loss = mefn_fast.TripletLoss()(scores[:3, :3])
    loss.backward()
    for name in ("image_encoder.proj.weight", "word_proj.weight", "cls_proj.weight", "global_query", "fusion_logit"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("text_encoder"))


def test_encode_texts_keeps_only_non_special_tokens():
    model = make().eval()  # no dropout, so that two encoder calls agree
    _, _, ids, mask = batch()
    txt = model.encode_texts(ids, mask)
    assert txt.lengths.tolist() == [7, 3, 1, 7]  # length minus [CLS] and [SEP]
    hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(txt.words[1, :3], model.word_proj(hidden[1, 1:4]))
    torch.testing.assert_close(txt.cls, model.cls_proj(hidden[:, 0]))
    # an explicit special-token mask: drop token 2 as well
    special = torch.zeros_like(mask)
    special[:, 0] = 1
    special[:, 2] = 1
    txt2 = model.encode_texts(ids, mask, special_tokens_mask=special)
    torch.testing.assert_close(txt2.words[0, :2], model.word_proj(hidden[0, [1, 3]]))
    # nothing but special tokens: [CLS] stands in as the one word
    txt3 = model.encode_texts(ids[:1, :2], torch.ones(1, 2, dtype=torch.long))
    assert txt3.lengths.tolist() == [1]


def test_global_branch_is_attention_pooling():
    model = make()
    feats, rl, _, _ = batch()
    img = model.encode_images(feats, rl)
    v = model.image_encoder(feats)
    for i in range(3):
        vi = v[i, : int(rl[i])]
        beta = torch.softmax(vi @ model.global_query / 4.0, dim=0)
        torch.testing.assert_close(img.global_[i], (beta[:, None] * vi).sum(0))


def test_ablation_switches():
    feats, rl, ids, mask = batch()
    full = make()
    img, txt = full.encode_images(feats, rl), full.encode_texts(ids, mask)
    local = mefn_fast.xattn_similarity(img.regions, img.lengths, txt.words, txt.lengths)
    glob = torch.nn.functional.normalize(img.global_, dim=-1) @ torch.nn.functional.normalize(txt.cls, dim=-1).T
    torch.testing.assert_close(full.similarity(img, txt), 0.5 * local + 0.5 * glob)

    no_local = make(use_local=False)
    assert torch.equal(no_local.similarity(img, txt), glob)  # exactly the global cosine
    no_global = make(use_global=False)
    assert torch.equal(no_global.similarity(img, txt), local)
    no_mfe = make(use_global=False, mfe=False)
    scan = mefn_fast.xattn_similarity(img.regions, img.lengths, txt.words, txt.lengths, mfe=False)
    assert torch.equal(no_mfe.similarity(img, txt), scan)
    assert not torch.allclose(scan, local)
    i2t = make(use_global=False, direction="i2t")
    assert torch.equal(i2t.similarity(img, txt),
                       mefn_fast.xattn_similarity(img.regions, img.lengths, txt.words, txt.lengths, direction="i2t"))
    with torch.no_grad():
        full.fusion_logit.fill_(2.0)
    g = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(full.similarity(img, txt), g * local + (1 - g) * glob)
    with pytest.raises(ValueError, match="use_local"):
        make(use_local=False, use_global=False)


def test_save_load_round_trip(tmp_path):
    model = make(mfe=False, tau=0.5, direction="both", attn_norm="none", agg="lse")
    with torch.no_grad():
        model.fusion_logit.fill_(0.3)
    feats, rl, ids, mask = batch()
    model.save(tmp_path / "ckpt")
    loaded = MEFN.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.opts == model.opts
    model.eval(), loaded.eval()
    assert torch.equal(model(feats, ids, mask, region_lengths=rl), loaded(feats, ids, mask, region_lengths=rl))


def test_text_encoder_from_local_folder_and_module(tmp_path):
    bert = transformers.BertModel(tiny_bert(), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    a = make(text_encoder=str(tmp_path / "bert")).eval()
    b = make(text_encoder=bert).eval()
    _, _, ids, mask = batch()
    torch.testing.assert_close(a.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                               b.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert a.config["text_encoder"] is None  # a folder of this machine is never recorded


@pytest.mark.parametrize("name,size,kwargs,n_regions", [
    ("resnet18", 64, {}, 4),  # 2 x 2 final feature map
    ("vit_tiny_patch16_224", 32, {"img_size": 32}, 4),  # 2 x 2 patches, [CLS] dropped
])
def test_timm_image_encoder(tmp_path, name, size, kwargs, n_regions):
    pytest.importorskip("timm")
    model = make(image_encoder="timm", timm_model=name, timm_kwargs=kwargs)
    images = torch.randn(2, 3, size, size)
    _, _, ids, mask = batch()
    img = model.encode_images(images)
    assert img.regions.shape == (2, n_regions, 16)
    scores = model(images, ids, mask)
    scores.sum().backward()
    assert scores.shape == (2, 4)
    assert model.image_encoder.backbone.parameters().__next__().grad is not None
    model.save(tmp_path / "m")
    loaded = MEFN.load(tmp_path / "m")
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(images, ids, mask), loaded(images, ids, mask))


def test_bad_model_input():
    model = make()
    feats, rl, ids, mask = batch()
    with pytest.raises(ValueError, match="region features"):
        model.encode_images(feats[..., :5])
    with pytest.raises(ValueError, match="region_lengths"):
        model.encode_images(feats, torch.tensor([6, 1, 1]))
    with pytest.raises(ValueError, match="image_encoder"):
        make(image_encoder="clip")
    with pytest.raises(ValueError, match="tau"):
        make(tau=0)
