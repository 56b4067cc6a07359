"""Evaluation: embed a data split, score every image against every caption in chunks, and report
the retrieval metrics of :mod:`mefn_fast.metrics` (``mefn-fast evaluate``).

    model, tokenizer, _ = load_trained("runs/synth")                    # a run folder or a checkpoint
    result = evaluate_split(model, PrecompDataset("data/synth", "test"), tokenizer)
    print(format_table(result))

Memory: the image and caption embeddings of the split are held (images x regions + captions x
words, times d); the (n_images, n_captions) score matrix is filled one (image chunk x caption
chunk) block at a time, so the cross-attention never sees more than ``image_chunk`` x
``caption_chunk`` pairs at once. Each block goes through :meth:`MEFN.similarity` and therefore
through the backend the model names (``"auto"``: the fastest one available).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .data.datasets import CaptionDataset, ImageView, pad_images
from .data.text import load_tokenizer, tokenize
from .metrics import METRIC_KEYS, coco_1k_5fold, retrieval_metrics
from .model import CONFIG_NAME, WEIGHTS_NAME, MEFN, ImageEmbeddings, TextEmbeddings

CHECKPOINT_FORMAT = "mefn_fast.train/1"
TOKENIZER_DIR = "tokenizer"


def _tqdm(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA only (``amp``: "auto" = bf16 where supported else fp16, "bf16",
    "fp16", "off"); a no-op context on the CPU."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp={amp!r} is not one of auto, off, bf16, fp16")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def encode_images(model: MEFN, dataset: CaptionDataset, *, batch_size: int = 128, device=None,
                  amp: str = "auto", workers: int = 0, progress: bool = False) -> ImageEmbeddings:
    """Embeddings of the split's unique images, in order (regions padded to the longest)."""
    device = device or next(model.parameters()).device
    loader = DataLoader(ImageView(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=pad_images, generator=torch.Generator())
    regions, lengths, globals_ = [], [], []
    with _tqdm(progress, total=dataset.n_images, desc="encode images", unit="img") as bar:
        for images, region_lengths in loader:
            with autocast(device, amp):
                e = model.encode_images(images.to(device), None if region_lengths is None else region_lengths.to(device))
            regions.append(e.regions.float())
            lengths.append(e.lengths)
            globals_.append(e.global_.float())
            bar.update(images.shape[0])
    n = max(r.shape[1] for r in regions)
    regions = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, n - r.shape[1])) for r in regions])
    return ImageEmbeddings(regions, torch.cat(lengths), torch.cat(globals_))


@torch.no_grad()
def encode_captions(model: MEFN, captions, tokenizer, *, batch_size: int = 256, max_length: Optional[int] = 64,
                    device=None, amp: str = "auto", progress: bool = False) -> TextEmbeddings:
    """Embeddings of a list of captions, in order (words padded to the longest caption)."""
    device = device or next(model.parameters()).device
    words, lengths, cls = [], [], []
    with _tqdm(progress, total=len(captions), desc="encode captions", unit="cap") as bar:
        for lo in range(0, len(captions), batch_size):
            tok = tokenize(tokenizer, captions[lo:lo + batch_size], max_length)
            with autocast(device, amp):
                e = model.encode_texts(tok["input_ids"].to(device), tok["attention_mask"].to(device),
                                       tok["special_tokens_mask"].to(device))
            words.append(e.words.float())
            lengths.append(e.lengths)
            cls.append(e.cls.float())
            bar.update(len(captions[lo:lo + batch_size]))
    m = max(w.shape[1] for w in words)
    words = torch.cat([torch.nn.functional.pad(w, (0, 0, 0, m - w.shape[1])) for w in words])
    return TextEmbeddings(words, torch.cat(lengths), torch.cat(cls))


@torch.no_grad()
def score_matrix(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings, *, image_chunk: int = 128,
                 caption_chunk: int = 640, amp: str = "auto", progress: bool = False) -> torch.Tensor:
    """The (n_images, n_captions) float32 score matrix on the CPU, one block at a time.

    Each caption chunk keeps only as many word slots as its longest caption needs; padding never
    changes a score, so the result does not depend on the chunk sizes.
    """
    if image_chunk < 1 or caption_chunk < 1:
        raise ValueError(f"image_chunk and caption_chunk must be >= 1; got {image_chunk}, {caption_chunk}")
    n_img, n_cap = img.regions.shape[0], txt.words.shape[0]
    out = torch.empty(n_img, n_cap, dtype=torch.float32)
    device = img.regions.device
    blocks = -(-n_img // image_chunk) * -(-n_cap // caption_chunk)
    with _tqdm(progress, total=blocks, desc="score", unit="block") as bar:
        for c0 in range(0, n_cap, caption_chunk):
            c1 = min(c0 + caption_chunk, n_cap)
            lens = txt.lengths[c0:c1]
            m = int(lens.max())
            t = TextEmbeddings(txt.words[c0:c1, :m], lens, txt.cls[c0:c1])
            for i0 in range(0, n_img, image_chunk):
                i1 = min(i0 + image_chunk, n_img)
                rl = img.lengths[i0:i1]
                n = int(rl.max())
                im = ImageEmbeddings(img.regions[i0:i1, :n], rl, img.global_[i0:i1])
                with autocast(device, amp):
                    out[i0:i1, c0:c1] = model.similarity(im, t).float().cpu()
                bar.update(1)
    return out


def chosen_backend(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings) -> str:
    """The backend that the model's local similarity runs on for these embeddings."""
    if not model.use_local:
        return "none (global branch only)"
    from .backends import select_backend

    name, _ = select_backend(model.backend, img.regions[:1], txt.words[:1], model.opts)
    return name


def split_metrics(scores: torch.Tensor, dataset: CaptionDataset, folds: int = 0) -> dict:
    """Retrieval metrics of the split, plus the mean over ``folds`` equal folds (COCO 1K) when > 1."""
    k = dataset.captions_per_image
    if k is not None:
        out = {"all": retrieval_metrics(scores, captions_per_image=k)}
    else:
        out = {"all": retrieval_metrics(scores, caption_image_ids=torch.as_tensor(dataset.caption_image))}
    if folds and folds > 1:
        if k is None or dataset.n_images % folds:
            raise ValueError(f"{dataset.n_images} images (captions per image: {k}) do not split into {folds} folds")
        out[f"{folds}fold"] = coco_1k_5fold(scores, captions_per_image=k, folds=folds)
    return out


def evaluate_split(model: MEFN, dataset: CaptionDataset, tokenizer, *, batch_size: int = 128,
                   image_chunk: int = 128, caption_chunk: int = 640, max_length: Optional[int] = 64,
                   folds: int = 0, amp: str = "auto", workers: int = 0, progress: bool = False) -> dict:
    """Embed, score and measure one split; returns metrics, sizes, backend, timings (and ``scores``)."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        img = encode_images(model, dataset, batch_size=batch_size, amp=amp, workers=workers, progress=progress)
        txt = encode_captions(model, dataset.captions, tokenizer, batch_size=2 * batch_size, max_length=max_length,
                              amp=amp, progress=progress)
        t1 = time.perf_counter()
        scores = score_matrix(model, img, txt, image_chunk=image_chunk, caption_chunk=caption_chunk, amp=amp,
                              progress=progress)
        t2 = time.perf_counter()
        backend = chosen_backend(model, img, txt)
    finally:
        model.train(was_training)
    result = {"n_images": dataset.n_images, "n_captions": len(dataset.captions), "backend": backend,
              "encode_seconds": t1 - t0, "score_seconds": t2 - t1}
    result["metrics"] = split_metrics(scores, dataset, folds)
    result["scores"] = scores
    return result


# ------------------------------------------------------------------------------- reporting
_COLUMNS = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"), ("meanr", "meanr"), ("mAP", "map"))


def format_table(result: dict, title: str = "") -> str:
    """A plain-text table: one row per direction and protocol, and rsum."""
    lines = [title] if title else []
    head = f"{'':<22}" + "".join(f"{c:>8}" for c, _ in _COLUMNS)
    for name, metrics in result["metrics"].items():
        label = ({"all": f"{result['n_images']} images"}.get(name)
                 or f"{result['n_images'] // int(name[:-4])} images, {name[:-4]}-fold mean")
        lines.append(f"{label}  (rsum {metrics['rsum']:.1f})")
        lines.append(head)
        for direction, what in (("i2t", "image -> text"), ("t2i", "text -> image")):
            lines.append(f"  {what:<20}" + "".join(f"{metrics[f'{direction}_{k}']:>8.1f}" for _, k in _COLUMNS))
    return "\n".join(lines)


def result_json(result: dict, **extra) -> dict:
    """The JSON-serialisable part of :func:`evaluate_split`'s result (no score matrix)."""
    out = {k: v for k, v in result.items() if k != "scores"}
    out.update(extra)
    return out


# ------------------------------------------------------------------------------- loading
def load_trained(path: str, map_location="cpu", tokenizer: Optional[str] = None):
    """(model, tokenizer, training info) from what ``mefn-fast train`` wrote.

    ``path`` is a run folder (its ``best/`` model, else ``last.pt``), a model folder written by
    :meth:`MEFN.save` (``config.json`` + ``weights.pt``, tokenizer in ``tokenizer/``) or a training
    checkpoint ``.pt``. ``tokenizer`` overrides the saved tokenizer (a folder, vocab.txt or name).
    """
    path = os.fspath(path)
    info: dict = {}
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(path, "best", CONFIG_NAME)):
            path = os.path.join(path, "best")
        elif os.path.isfile(os.path.join(path, "last.pt")):
            path = os.path.join(path, "last.pt")
        else:
            raise FileNotFoundError(f"{path}: neither a model folder (config.json, weights.pt), a run folder "
                                    "(best/ or last.pt) nor a checkpoint")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise FileNotFoundError(f"{os.path.join(path, WEIGHTS_NAME)}: missing model weights")
        model = MEFN.load(path, map_location=map_location)
        state_path = os.path.join(path, "train_state.json")
        if os.path.isfile(state_path):
            with open(state_path) as f:
                info = json.load(f)
        tok_dirs = [os.path.join(path, TOKENIZER_DIR), os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint")
        ckpt = load_checkpoint(path)
        model = MEFN(**MEFN.config_kwargs(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.config = ckpt["model_config"]
        info = {k: ckpt[k] for k in ("epoch", "step", "best_rsum", "train_config") if k in ckpt}
        tok_dirs = [os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    if tokenizer is None:
        found = [d for d in tok_dirs if os.path.isdir(d)]
        if not found:
            raise FileNotFoundError(f"no tokenizer saved beside {path} (looked in {', '.join(tok_dirs)}); pass one")
        tokenizer = found[0]
    return model, load_tokenizer(tokenizer), info


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :mod:`mefn_fast.train` (plain tensors and Python values)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable mefn_fast training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a mefn_fast training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


__all__ = ["encode_images", "encode_captions", "score_matrix", "split_metrics", "evaluate_split", "format_table",
           "result_json", "load_trained", "load_checkpoint", "METRIC_KEYS"]
