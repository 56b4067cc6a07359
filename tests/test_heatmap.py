"""``mefn-fast heatmap``: a PNG of the expected size whose numbers are those of entropy_map."""
from __future__ import annotations

import json

import pytest
import torch

from mefn_fast import entropy_map
from mefn_fast.cli import main
from mefn_fast.retrieval.data import PrecompDataset, SynthConfig, tokenize, write_synth
from mefn_fast.retrieval.checkpoint import load_trained
from mefn_fast.retrieval.evaluate import pair_entropy_map
from mefn_fast.retrieval.train import TrainConfig, build_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_heat")
    write_synth(str(root), SynthConfig(seed=3, train=4, dev=0, test=5, testall_folds=0, regions=6, region_dim=8,
                                       max_objects=3))
    torch.manual_seed(0)
    model, tok = build_model(TrainConfig(data=str(root), embed_dim=16, text_hidden=16, text_layers=1, tau=0.3),
                             PrecompDataset(str(root), "test"))
    out = root / "run"
    model.save(out / "best")
    tok.save_pretrained(str(out / "tokenizer"))
    return str(root), str(out)


def _expected_png_size(n_rows: int, n_cols: int, dpi: int) -> tuple:
    """draw_entropy_map's figure: (2 x max(6, 0.45 m + 3)) x max(5, 0.22 n + 3.5) inches."""
    width = max(6.0, 0.45 * n_cols + 3.0)
    height = max(5.0, 0.22 * n_rows + 3.5)
    return round(2 * width * dpi), round(height * dpi)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_heatmap_command_writes_png_with_entropy_map_numbers(run, tmp_path, capsys, direction):
    from PIL import Image

    data, run_dir = run
    png = tmp_path / "fig.png"
    assert main(["heatmap", run_dir, "--data", data, "--split", "test", "--image", "3", "--caption", "7",
                 "--direction", direction, "--out", str(png), "--dpi", "50"]) == 0
    assert "entropy map of test image 3 x caption 7" in capsys.readouterr().out
    numbers = json.loads((tmp_path / "fig.json").read_text())

    # independently: the model's embeddings of image 3 and caption 7, through entropy_map
    model, tok, _ = load_trained(run_dir)
    model.eval()  # no dropout
    ds = PrecompDataset(data, "test")
    caption = ds.captions[7]
    with torch.no_grad():
        img = model.encode_images(ds.image(3)[None])
        t = tokenize(tok, [caption], 64)
        txt = model.encode_texts(t["input_ids"], t["attention_mask"], t["special_tokens_mask"])
    want = entropy_map(img.regions[0], txt.words[0, :int(txt.lengths[0])], direction=direction, tau=0.3, mfe=True)
    for key in ("A", "h", "H", "H_norm", "w", "MFE", "R", "score"):
        torch.testing.assert_close(torch.tensor(numbers[key], dtype=torch.float32), getattr(want, key), rtol=0,
                                   atol=1e-6, msg=key)
    words = caption.replace(".", " .").split()
    regions = [f"r{r}" for r in range(6)]
    query, context = (words, regions) if direction == "t2i" else (regions, words)
    assert numbers["query_labels"] == query and numbers["context_labels"] == context
    assert numbers["text"] == caption and numbers["direction"] == direction
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == _expected_png_size(len(context), len(query), 50)


def test_default_caption_and_errors(run, tmp_path, capsys):
    data, run_dir = run
    assert main(["heatmap", run_dir, "--data", data, "--image", "2", "--out", str(tmp_path / "h.png")]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["caption"] == 10  # the image's first caption
    capsys.readouterr()
    assert main(["heatmap", run_dir, "--data", data, "--image", "2", "--caption", "99",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("mefn-fast: error: caption 99 is not in")
    model, tok, _ = load_trained(run_dir)
    maps, words, regions = pair_entropy_map(model, PrecompDataset(data, "test"), tok, 0, 0)
    assert maps.h.shape == (len(regions), len(words)) and len(regions) == 6
