"""Distributed training and evaluation (2 gloo processes launched by torchrun on 127.0.0.1) equal
one process; the global-batch loss split over ranks; top-k streaming through ``mefn-fast evaluate``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mefn_fast.cli import main
from mefn_fast.retrieval.data import PrecompDataset, SynthConfig, write_synth
from mefn_fast.retrieval.distributed import shard_ranges, triplet_rows_cols
from mefn_fast.retrieval.checkpoint import load_trained
from mefn_fast.retrieval.evaluate import evaluate_split
from mefn_fast.model.losses import TripletLoss
from mefn_fast.retrieval.train import RankBatchSampler, EpochBatchSampler, TrainConfig, train

TINY = dict(embed_dim=16, text_hidden=16, text_layers=1, text_dropout=0.0, threads=1, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_dist")
    write_synth(str(root), SynthConfig(seed=2, train=24, dev=0, test=7, testall_folds=0, regions=5, region_dim=8,
                                       max_objects=3))
    return str(root)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc: int = 2, timeout: float = 120) -> str:
    """``torchrun --nproc-per-node nproc -m mefn_fast.cli ARGS`` on the loopback interface only."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "mefn_fast.cli", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _weights(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_process_training_equals_one_process_on_the_global_batch(data, tmp_path):
    """2 ranks x 10 pairs with gathered negatives == 1 process x 20 pairs, for 4 AdamW steps.

    Tolerance 1e-5 (absolute, on weights of size ~0.1-1): the two runs sum the same gradient
    terms in another order (DDP's all-reduce of per-rank sums; the score matrix in rank blocks),
    which changes float32 results in the last bits (measured: ~1e-7). Without gathering, the
    negatives differ and the weights move apart by ~1e-2, so the tolerance does tell them apart.
    """
    common = dict(data=data, epochs=2, lr=1e-3, max_steps=4, dev_split=None, seed=1, **TINY)
    one = train(TrainConfig(out=str(tmp_path / "one"), batch_size=20, **common), log=lambda *_: None)
    flags = ["train", "--data", data, "--epochs", 2, "--lr", 1e-3, "--max-steps", 4, "--dev-split", "none", "--seed",
             1, "--embed-dim", 16, "--text-hidden", 16, "--text-layers", 1, "--text-dropout", 0, "--threads", 1,
             "--no-progress", "--batch-size", 10]
    out = torchrun(flags + ["--out", tmp_path / "two"])
    assert "2 processes x 10 pairs" in out and "negatives from the global batch" in out
    torchrun(flags + ["--out", tmp_path / "local", "--no-gather-negatives"])

    a = one["model"].state_dict()
    two, local = _weights(tmp_path / "two" / "last.pt"), _weights(tmp_path / "local" / "last.pt")
    assert two["step"] == 4 and two["world_size"] == 2 and len(two["rng_ranks"]) == 2
    diff = {k: float((a[k].float() - two["model"][k].float()).abs().max()) for k in a}
    assert max(diff.values()) < 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:3]
    far = max(float((a[k].float() - local["model"][k].float()).abs().max()) for k in a)
    assert far > 1e-3
    # the logged loss is the global batch's loss
    assert two["history"][-1]["loss"] == pytest.approx(one["history"][-1]["loss"], rel=1e-5)


def test_two_process_evaluation_equals_one_process(data, tmp_path):
    """Full score matrix and top-k lists over 2 ranks are bit-identical to one process; the
    sizes (7 images in 4 blocks, 35 captions in 9 batches) leave the ranks unequal shares."""
    torch.manual_seed(0)
    run = tmp_path / "run"
    train(TrainConfig(data=data, out=str(run), epochs=1, batch_size=24, max_steps=1, dev_split=None, **TINY),
          log=lambda *_: None)
    ev = ["evaluate", run, "--data", data, "--split", "test", "--threads", 1, "--no-progress", "--batch-size", 2,
          "--image-chunk", 2, "--caption-chunk", 6]
    out = torchrun(ev + ["--out", tmp_path / "e2.json", "--scores", tmp_path / "s2.npy"])
    assert "2 processes" in out
    torchrun(ev + ["--topk", 3, "--topk-out", tmp_path / "t2.npz"])
    model, tok, _ = load_trained(str(run))
    res = evaluate_split(model, PrecompDataset(data, "test"), tok, batch_size=2, image_chunk=2, caption_chunk=6)
    assert np.array_equal(np.load(tmp_path / "s2.npy"), res["scores"].numpy())
    assert main([str(a) for a in ev + ["--topk", 3, "--topk-out", tmp_path / "t1.npz"]]) == 0
    one, two = np.load(tmp_path / "t1.npz"), np.load(tmp_path / "t2.npz")
    assert set(one.files) == {"captions_of_image", "captions_of_image_scores", "images_of_caption",
                              "images_of_caption_scores"}
    for k in one.files:
        assert np.array_equal(one[k], two[k]), k


def test_topk_through_evaluate_equals_sorting_the_full_matrix(data, tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    train(TrainConfig(data=data, out=str(run), epochs=1, batch_size=24, max_steps=1, dev_split=None, **TINY),
          log=lambda *_: None)
    model, tok, _ = load_trained(str(run))
    ds = PrecompDataset(data, "test")
    full = evaluate_split(model, ds, tok, image_chunk=3, caption_chunk=4)["scores"].double()
    for k in (1, 4, 50):
        assert main(["evaluate", str(run), "--data", data, "--split", "test", "--topk", str(k), "--image-chunk", "3",
                     "--caption-chunk", "4", "--topk-out", str(tmp_path / "t.npz"), "--no-progress"]) == 0
        assert "top-k" in capsys.readouterr().out
        got = np.load(tmp_path / "t.npz")
        for name, mat in (("captions_of_image", full), ("images_of_caption", full.t())):
            order = torch.sort(mat, dim=1, descending=True, stable=True)
            kk = min(k, mat.shape[1])
            assert np.array_equal(got[name], order.indices[:, :kk].numpy()), (k, name)
            assert np.array_equal(got[name + "_scores"], order.values[:, :kk].numpy()), (k, name)


def test_global_loss_splits_over_ranks():
    """The ranks' triplet_rows_cols sum to TripletLoss of the global matrix (both negatives modes)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 12, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9])
    for hardest in (True, False):
        want = TripletLoss(0.2, hardest)(scores, ids)
        for world in (1, 2, 3, 4):
            b = 12 // world
            got = sum(triplet_rows_cols(scores[r * b:(r + 1) * b], scores[:, r * b:(r + 1) * b], r * b, ids,
                                        ids[r * b:(r + 1) * b], 0.2, hardest) for r in range(world))
            torch.testing.assert_close(got, want)


def test_rank_batches_and_shards():
    full = list(EpochBatchSampler(50, 12, seed=3, epoch=1))
    parts = [list(RankBatchSampler(EpochBatchSampler(50, 12, seed=3, epoch=1), r, 3)) for r in range(3)]
    assert [sum((p[k] for p in parts), []) for k in range(len(full))] == full
    assert [list(shard_ranges(9, 4, r)) for r in range(4)] == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]
    assert [len(shard_ranges(1, 3, r)) for r in range(3)] == [1, 0, 0]


def test_two_process_resume_is_bit_identical(data, tmp_path):
    """Under torchrun too, 8 steps == 4 steps + 4 resumed (across an epoch boundary, the warm-up
    switch and dropout: each rank's RNG state is checkpointed)."""
    flags = ["train", "--data", data, "--epochs", 3, "--lr", 1e-3, "--warmup-epochs", 1, "--dev-split", "none",
             "--embed-dim", 16, "--text-hidden", 16, "--text-layers", 1, "--threads", 1, "--no-progress",
             "--batch-size", 4]  # 3 steps per epoch; dropout on
    torchrun(flags + ["--out", tmp_path / "a", "--max-steps", 8])
    torchrun(flags + ["--out", tmp_path / "b", "--max-steps", 4])
    torchrun(flags + ["--out", tmp_path / "b", "--max-steps", 8, "--resume", tmp_path / "b"])
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
