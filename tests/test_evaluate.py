"""Evaluation: the chunked score matrix, the metrics, checkpoint loading and ``mefn-fast evaluate``."""
from __future__ import annotations

import json

import pytest
import torch

from mefn_fast import coco_1k_5fold, retrieval_metrics
from mefn_fast.cli import main
from mefn_fast.retrieval.data import KarpathyDataset, PrecompDataset, SynthConfig, write_synth
from mefn_fast.retrieval.checkpoint import load_trained
from mefn_fast.retrieval.evaluate import (encode_captions, encode_images, evaluate_split, format_table, result_json,
                                          score_matrix)
from mefn_fast.retrieval.train import TrainConfig, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_eval")
    write_synth(str(root), SynthConfig(seed=1, train=4, dev=4, test=6, testall_folds=2, regions=6, region_dim=16,
                                       min_objects=1, max_objects=4))
    cfg = TrainConfig(data=str(root), embed_dim=24, text_hidden=32, text_layers=1)
    test = PrecompDataset(str(root), "test")
    torch.manual_seed(0)
    model, tok = build_model(cfg, test)
    model.eval()
    return root, model, tok, test


def test_chunked_score_matrix_equals_unchunked(setup):
    _, model, tok, ds = setup
    img = encode_images(model, ds, batch_size=4)
    txt = encode_captions(model, ds.captions, tok, batch_size=7)
    # regions of 6 images x captions of ragged lengths, both padded
    assert img.regions.shape[:2] == (6, 6) and txt.words.shape[0] == 30
    assert int(txt.lengths.min()) < txt.words.shape[1]
    with torch.no_grad():
        full = model.similarity(img, txt)
        # each caption alone, unpadded, scored against all images
        single = torch.stack([model.similarity(img, type(txt)(txt.words[j:j + 1, :int(txt.lengths[j])],
                                                              txt.lengths[j:j + 1], txt.cls[j:j + 1]))[:, 0]
                              for j in range(30)], dim=1)
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-6)
    for ic, cc in ((1000, 1000), (1, 1), (4, 7), (5, 30), (6, 11)):
        s = score_matrix(model, img, txt, image_chunk=ic, caption_chunk=cc)
        assert s.shape == (6, 30) and s.dtype == torch.float32
        torch.testing.assert_close(s, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image_chunk"):
        score_matrix(model, img, txt, image_chunk=0)
    # encoding in other batch sizes gives the same embeddings
    img2 = encode_images(model, ds, batch_size=100)
    torch.testing.assert_close(img2.regions, img.regions)
    torch.testing.assert_close(score_matrix(model, img2, encode_captions(model, ds.captions, tok, batch_size=1)),
                               full, rtol=1e-5, atol=1e-6)


def test_metrics_equal_the_library(setup):
    root, model, tok, ds = setup
    res = evaluate_split(model, ds, tok, batch_size=4, image_chunk=4, caption_chunk=9)
    scores = res["scores"]
    assert res["metrics"]["all"] == retrieval_metrics(scores, captions_per_image=5)
    assert (res["n_images"], res["n_captions"]) == (6, 30) and res["backend"]
    assert not model.training

    testall = PrecompDataset(str(root), "testall")
    res = evaluate_split(model, testall, tok, folds=2, image_chunk=5, caption_chunk=13)
    assert res["metrics"]["all"] == retrieval_metrics(res["scores"])
    assert res["metrics"]["2fold"] == coco_1k_5fold(res["scores"], captions_per_image=5, folds=2)
    # fold 0 of testall is the test split
    assert res["metrics"]["2fold"]["folds"][0] == retrieval_metrics(scores)
    table = format_table(res, "title")
    assert "title" in table and "6 images, 2-fold mean" in table and "text -> image" in table
    json.dumps(result_json(res))
    with pytest.raises(ValueError, match="do not split into 5 folds"):
        evaluate_split(model, testall, tok, folds=5)


def test_irregular_caption_layout_uses_caption_ids(setup, tmp_path):
    _, model, tok, _ = setup
    from PIL import Image

    images = []
    for i, n in enumerate((2, 4, 3)):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "test",
                       "sentences": [{"raw": f"a red square {k}"} for k in range(n)]})
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    ds = KarpathyDataset(str(tmp_path / "d.json"), "test", captions_per_image=None)
    assert ds.captions_per_image is None
    # a stand-in for the image side: score with random "features" of the right width
    scores = torch.randn(3, 9)
    from mefn_fast.retrieval.evaluate import split_metrics

    assert split_metrics(scores, ds)["all"] == retrieval_metrics(scores, caption_image_ids=[0, 0, 1, 1, 1, 1, 2, 2, 2])


def test_load_trained_and_evaluate_command(setup, tmp_path, capsys):
    root, model, tok, ds = setup
    run = tmp_path / "run"
    model.save(run / "best")
    tok.save_pretrained(str(run / "tokenizer"))
    loaded, tok2, _ = load_trained(str(run))
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert tok2("a red square")["input_ids"] == tok("a red square")["input_ids"]

    out = tmp_path / "res.json"
    assert main(["evaluate", str(run), "--data", str(root), "--split", "testall", "--out", str(out), "--no-progress",
                 "--image-chunk", "5", "--caption-chunk", "7", "--backend", "reference",
                 "--scores", str(tmp_path / "s.npy")]) == 0
    printed = capsys.readouterr().out
    assert "image -> text" in printed and "12 images" in printed and "6 images, 5-fold" not in printed
    res = json.loads(out.read_text())
    assert res["split"] == "testall" and res["backend"] == "reference" and set(res["metrics"]) == {"all"}
    import numpy as np

    s = torch.from_numpy(np.load(tmp_path / "s.npy"))
    assert res["metrics"]["all"] == pytest.approx(retrieval_metrics(s))
    # 'auto' folds: 12 images do not make 5 folds, so only the full table; --folds 2 adds the 2-fold mean
    assert main(["evaluate", str(run / "best"), "--data", str(root), "--split", "testall", "--folds", "2",
                 "--no-progress", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"all", "2fold"}

    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        load_trained(str(tmp_path))
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"x\.pt: not a readable mefn_fast training checkpoint"):
        load_trained(str(tmp_path / "x.pt"))
