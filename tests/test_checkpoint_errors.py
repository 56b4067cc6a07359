"""Damaged run folders, model folders and training checkpoints: a FileNotFoundError or ValueError
that names the file and what is wrong with it, never a bare unpickling, zip, JSON or key error,
and never advice to load the file unsafely (``weights_only=False``)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mefn_fast.retrieval.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_trained
from mefn_fast.retrieval.data import SynthConfig, write_synth
from mefn_fast.retrieval.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run folder of 'mefn-fast train': last.pt, best/ (with train_state.json), tokenizer/."""
    root = tmp_path_factory.mktemp("ckpt_errors")
    data = root / "data"
    write_synth(str(data), SynthConfig(seed=2, train=8, dev=4, test=0, regions=4, region_dim=8))
    cfg = TrainConfig(data=str(data), out=str(root / "run"), epochs=1, batch_size=8, embed_dim=8, text_hidden=16,
                      text_layers=1, text_heads=2, progress=False)
    train(cfg, log=lambda *_: None)
    run = root / "run"
    assert {"last.pt", "best", "tokenizer"} <= set(os.listdir(run))
    assert {"config.json", "model.safetensors", "train_state.json"} <= set(os.listdir(run / "best"))
    return run, data


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the run folder, to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained[0], dst)
    return dst


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Unsafe:
    """A Python object that a weights-only load refuses."""


def _legacy(best, state):
    """Turn ``best`` into a folder of the first format (config.json without a format key, torch.save'd
    ``weights.pt``) holding ``state``."""
    config = json.loads((best / "config.json").read_text())
    config.pop("mefn_fast_format")
    (best / "config.json").write_text(json.dumps(config))
    os.remove(best / "model.safetensors")
    torch.save(state, best / "weights.pt")


def _assert_error(exc, match, call):
    with pytest.raises(exc, match=match) as err:
        call()
    assert "weights_only" not in str(err.value)
    return err.value


# ----------------------------------------------------------------------------- last.pt
@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "last.pt: not a readable mefn_fast training checkpoint"),
    (lambda p: p.write_bytes(b""), "last.pt: not a readable .*empty"),
    (_truncate, "last.pt: not a readable .*truncated"),
    (lambda p: _truncate(p, 0.999), "last.pt: not a readable .*truncated"),
    (lambda p: torch.save({"format": CHECKPOINT_FORMAT, "x": Unsafe()}, p), "last.pt: .*Python objects"),
    (lambda p: torch.save([1, 2, 3], p), "last.pt: not a mefn_fast training checkpoint"),
    (lambda p: torch.save({"model": {}}, p), "last.pt: not a mefn_fast training checkpoint"),
    (lambda p: torch.save({"format": "mefn_fast.train/7"}, p), r"last.pt: .*'mefn_fast.train/7'.*newer"),
    (lambda p: torch.save({"format": "mefn_fast.train/x"}, p), r"last.pt: .*'mefn_fast.train/x'"),
    (lambda p: torch.save({"format": CHECKPOINT_FORMAT}, p), "last.pt: incomplete training checkpoint: no model_config"),
])
def test_damaged_last_pt(run, damage, match):
    ckpt = run / "last.pt"
    damage(ckpt)
    _assert_error(ValueError, match, lambda: load_checkpoint(str(ckpt)))
    _assert_error(ValueError, match, lambda: load_trained(str(ckpt)))


def _edit_checkpoint(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("optimizer"), "last.pt: incomplete training checkpoint: no optimizer"),
    (lambda c: c.update(model=[1]), "last.pt: damaged training checkpoint: model is a list"),
    (lambda c: c["model"].pop("fusion_logit"), "last.pt: its model weights do not fit its model_config"),
    (lambda c: c["model_config"].update(embed_dim=12), "last.pt: its model weights do not fit"),
    (lambda c: c["model_config"].update(no_such_option=1), "last.pt: its model_config does not describe a MEFN model"),
    (lambda c: c["model_config"].pop("text_config"), "last.pt: its model_config does not describe a MEFN model"),
    (lambda c: c["model_config"].update(tau=-1.0), "last.pt: its model_config does not describe a MEFN model.*tau"),
])
def test_incomplete_or_inconsistent_last_pt(run, edit, match):
    ckpt = run / "last.pt"
    _edit_checkpoint(ckpt, edit)
    _assert_error(ValueError, match, lambda: load_trained(str(ckpt)))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(optimizer={"state": {}, "param_groups": []}), "last.pt: damaged training state"),
    (lambda c: c.update(step="three"), "last.pt: damaged training state"),
    (lambda c: c.update(rng={"torch": torch.zeros(3)}), "last.pt: damaged training state"),
])
def test_resume_from_a_damaged_training_state(run, trained, edit, match):
    ckpt = run / "last.pt"
    _edit_checkpoint(ckpt, edit)
    cfg = TrainConfig(data=str(trained[1]), out=str(run), resume=str(run), epochs=2, batch_size=8, progress=False)
    _assert_error(ValueError, match, lambda: train(cfg, log=lambda *_: None))


def test_resume_from_a_garbage_checkpoint_names_it(run, trained):
    (run / "last.pt").write_bytes(b"\x80\x02garbage")
    cfg = TrainConfig(data=str(trained[1]), out=str(run), resume=str(run), epochs=2, batch_size=8, progress=False)
    _assert_error(ValueError, "last.pt: not a readable", lambda: train(cfg, log=lambda *_: None))


def test_resume_from_a_missing_checkpoint_names_it(run, trained):
    os.remove(run / "last.pt")
    cfg = TrainConfig(data=str(trained[1]), out=str(run), resume=str(run), epochs=2, batch_size=8, progress=False)
    _assert_error(FileNotFoundError, "last.pt: missing", lambda: train(cfg, log=lambda *_: None))


# ----------------------------------------------------------------------------- best/ (a model folder)
@pytest.mark.parametrize("damage,exc,match", [
    (lambda b: os.remove(b / "config.json"), FileNotFoundError, "best/config.json: missing"),
    (lambda b: os.remove(b / "model.safetensors"), FileNotFoundError, "best/model.safetensors: missing"),
    (lambda b: (b / "config.json").write_text("{\"embed_dim\": 8,"), ValueError, "best/config.json: not valid JSON"),
    (lambda b: (b / "config.json").write_bytes(b"\xff\xfe\x00garbage"), ValueError, "best/config.json: not"),
    (lambda b: (b / "config.json").write_text("[1, 2]"), ValueError, "best/config.json: a MEFN configuration is a JSON object"),
    (lambda b: (b / "config.json").write_text("{}"), ValueError, "best/config.json: not a complete MEFN configuration"),
    (lambda b: _truncate(b / "model.safetensors"), ValueError, "best/model.safetensors: unreadable model weights"),
    (lambda b: (b / "model.safetensors").write_bytes(b"garbage"), ValueError, "best/model.safetensors: unreadable"),
    (lambda b: (b / "model.safetensors").write_bytes(b""), ValueError, "best/model.safetensors: unreadable"),
    (lambda b: _legacy(b, {"x": Unsafe()}), ValueError, "best/weights.pt: unreadable model weights: .*Python objects"),
    (lambda b: save_file({"fusion_logit": torch.zeros(())}, str(b / "model.safetensors")), ValueError,
     "best/model.safetensors: the weights do not fit the configuration beside them"),
    (lambda b: (b / "train_state.json").write_text("{\"epoch\": 1, \"st"), ValueError,
     "best/train_state.json: not valid JSON"),
    (lambda b: (b / "train_state.json").write_text("null"), ValueError, "best/train_state.json: .* must be a JSON object; got null"),
])
def test_damaged_best_model(run, damage, exc, match):
    damage(run / "best")
    # through the run folder: a damaged best/ is reported, never replaced by last.pt in silence
    _assert_error(exc, match, lambda: load_trained(str(run)))
    _assert_error(exc, match, lambda: load_trained(str(run / "best")))


def test_empty_best_folder_is_reported(run):
    shutil.rmtree(run / "best")
    os.mkdir(run / "best")
    _assert_error(FileNotFoundError, "best/config.json: missing; a saved MEFN folder holds",
                  lambda: load_trained(str(run)))


def test_missing_or_damaged_tokenizer(run):
    shutil.rmtree(run / "tokenizer")
    shutil.rmtree(run / "best" / "tokenizer")
    _assert_error(FileNotFoundError, "no tokenizer saved beside", lambda: load_trained(str(run)))
    os.mkdir(run / "tokenizer")  # an empty folder is no tokenizer
    _assert_error(ValueError, "tokenizer: no usable tokenizer", lambda: load_trained(str(run)))


def test_nonexistent_path(tmp_path):
    _assert_error(FileNotFoundError, "nope: no such run folder", lambda: load_trained(str(tmp_path / "nope")))
    _assert_error(FileNotFoundError, "nope.pt: no such run folder", lambda: load_trained(str(tmp_path / "nope.pt")))


def test_intact_run_folder_still_loads(run, trained):
    """The checks cost nothing to a good run folder: best/ wins over last.pt, its info is read."""
    model, tok, info = load_trained(str(run))
    assert info["epoch"] == 1 and "train_config" in info
    model2, _, info2 = load_trained(str(run / "last.pt"))
    assert info2["step"] == 5
    ref = json.loads((run / "best" / "config.json").read_text())
    assert ref.pop("mefn_fast_format") == 1 and model.config == ref
