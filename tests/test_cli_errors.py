"""``mefn-fast``'s answer to user mistakes: one line ``mefn-fast: error: ...`` on stderr and exit
status 2 (flag values argparse can check keep argparse's usage line and status 2); ``--debug``
shows the traceback instead; an internal error prints its traceback and exits with status 1."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mefn_fast import cli
from mefn_fast.cli import main
from mefn_fast.retrieval.data import PrecompDataset, SynthConfig, write_synth
from mefn_fast.retrieval.train import TrainConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A synthetic data set, a model folder with its tokenizer, and damaged files beside them."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = root / "data"
    write_synth(str(data), SynthConfig(seed=3, train=8, dev=0, test=4, testall_folds=0, regions=4, region_dim=8))
    cfg = TrainConfig(data=str(data), embed_dim=8, text_hidden=16, text_layers=1)
    torch.manual_seed(0)
    model, tok = build_model(cfg, PrecompDataset(str(data), "test"))
    model.save(root / "model")
    tok.save_pretrained(str(root / "model" / "tokenizer"))
    (root / "broken").mkdir()
    model.save(root / "broken")
    tok.save_pretrained(str(root / "broken" / "tokenizer"))
    (root / "broken" / "model.safetensors").write_bytes(b"\x00" * 100)
    (root / "bad_data").mkdir()
    np.save(root / "bad_data" / "test_ims.npy", np.zeros((2, 3), dtype=np.float32))  # 2-D, not (n, regions, F)
    (root / "bad_data" / "test_caps.txt").write_text("a\n" * 10)
    (root / "garbage.json").write_text("{\"epochs\": ")
    (root / "list.json").write_text("[1]")
    (root / "garbage.pt").write_bytes(b"garbage")
    (root / "a_file").write_text("x")
    return {k: str(v) for k, v in dict(root=root, data=data, model=root / "model", broken=root / "broken",
                                       bad_data=root / "bad_data", garbage_json=root / "garbage.json",
                                       list_json=root / "list.json", garbage_pt=root / "garbage.pt",
                                       a_file=root / "a_file").items()}


def _fill(args, files, tmp_path):
    return [a.format(**files, tmp=tmp_path) for a in args]


def _one_error_line(capsys, expect):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mefn-fast: error: "), err
    assert expect in lines[0], err
    return lines[0]


USER_MISTAKES = [
    (["evaluate", "{tmp}/nope", "--data", "{data}"], "nope: no such run folder"),
    (["evaluate", "{broken}", "--data", "{data}"], "model.safetensors: unreadable model weights"),
    (["evaluate", "{garbage_pt}", "--data", "{data}"], "garbage.pt: not a readable mefn_fast training checkpoint"),
    (["evaluate", "{model}", "--data", "{tmp}/no_data"], "no_data: no such data folder"),
    (["evaluate", "{model}", "--data", "{bad_data}"], "test_ims.npy: expected a float array"),
    (["evaluate", "{model}", "--data", "{data}", "--split", "nosuch"], "nosuch_ims.npy: missing"),
    (["evaluate", "{model}", "--data", "{garbage_json}"], "garbage.json: not valid JSON"),
    (["evaluate", "{model}", "--data", "{data}", "--device", "tpu"], "device"),
    (["evaluate", "{model}", "--data", "{data}", "--backend", "nope"], "backend='nope'"),
    (["evaluate", "{model}", "--data", "{data}", "--tokenizer", "{tmp}/no_tok"], "no_tok"),
    (["evaluate", "{model}", "--data", "{data}", "--out", "{a_file}/r.json", "--no-progress"], "a_file"),
    (["train", "--data", "{tmp}/no_data", "--out", "{tmp}/run"], "no_data: no such data folder"),
    (["train", "--config", "{tmp}/missing.json"], "missing.json"),
    (["train", "--config", "{garbage_json}"], "garbage.json"),
    (["train", "--config", "{list_json}"], "list.json: training options must be a JSON object"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--batch-size", "1"], "batch_size must be >= 2"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--text-encoder", "{tmp}/no-such-model"], "no-such-model"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--resume", "{garbage_pt}"], "garbage.pt: not a readable"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--threads", "-2"], "threads"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--workers", "-1"], "workers"),
    (["train", "--data", "{data}", "--out", "{a_file}", "--dev-split", "none"], "a_file"),
    (["synth", "{tmp}/s", "--max-objects", "20"], "max_objects"),
    (["synth", "{a_file}"], "a_file"),
    (["heatmap", "{model}", "--data", "{data}", "--image", "99"], "--image 99 is not in [0, 4)"),
    (["heatmap", "{model}", "--data", "{data}", "--caption", "999"], "not in"),
    (["ablation", "--out", "{tmp}/abl", "--train-config", "{tmp}/missing.json"], "missing.json"),
    (["ablation", "--out", "{tmp}/abl", "--train-config", "{garbage_json}"], "garbage.json: not valid JSON"),
    (["ablation", "--out", "{tmp}/abl", "--train-config", "{list_json}"], "list.json: training options must be a JSON object"),
]


@pytest.mark.parametrize("args,expect", USER_MISTAKES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USER_MISTAKES])
def test_user_mistakes_are_one_line_and_status_2(files, tmp_path, capsys, args, expect):
    assert main(_fill(args, files, tmp_path)) == 2
    _one_error_line(capsys, expect)


BAD_FLAG_VALUES = [
    ["evaluate", "{model}", "--data", "{data}", "--topk", "0"],
    ["evaluate", "{model}", "--data", "{data}", "--folds", "abc"],
    ["evaluate", "{model}", "--data", "{data}", "--folds", "-1"],
    ["evaluate", "{model}", "--data", "{data}", "--batch-size", "0"],
    ["evaluate", "{model}", "--data", "{data}", "--image-chunk", "-3"],
    ["evaluate", "{model}", "--data", "{data}", "--threads", "0"],
    ["evaluate", "{model}", "--data", "{data}", "--workers", "-1"],
    ["heatmap", "{model}", "--data", "{data}", "--image", "-1"],
    ["heatmap", "{model}", "--data", "{data}", "--dpi", "0"],
    ["synth", "{tmp}/s", "--png-size", "0"],
    ["ablation", "--out", "{tmp}/abl", "--threads", "0"],
]


@pytest.mark.parametrize("args", BAD_FLAG_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a in BAD_FLAG_VALUES])
def test_bad_flag_values_are_argparse_errors(files, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(_fill(args, files, tmp_path))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"mefn-fast {args[0]}: error: argument {args[-2]}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(files, tmp_path, where):
    args = ["evaluate", str(tmp_path / "nope"), "--data", files["data"]]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        main(args)


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("an internal inconsistency")

    help_, add, _ = cli.COMMANDS["info"]
    monkeypatch.setitem(cli.COMMANDS, "info", (help_, add, broken))
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal inconsistency" in err
    assert err.strip().splitlines()[-1].startswith("mefn-fast: internal error")
    with pytest.raises(RuntimeError, match="an internal inconsistency"):
        main(["info", "--debug"])


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    help_, add, _ = cli.COMMANDS["info"]
    monkeypatch.setitem(cli.COMMANDS, "info", (help_, add, interrupted))
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "mefn-fast: interrupted"


def test_the_command_line_program(files, tmp_path):
    """The real process: status 2 and one line on stderr; with --debug the traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "mefn_fast.cli", "evaluate", str(tmp_path / "nope"), "--data", files["data"]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"mefn-fast: error: {tmp_path / 'nope'}: no such run folder, model "
                                             "folder or checkpoint"]
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr
