"""Evaluation: embed a data split, score every image against every caption in chunks, and report
the retrieval metrics of :mod:`mefn_fast.model.metrics` (``mefn-fast evaluate``).

    model, tokenizer, _ = load_trained("runs/synth")       # mefn_fast.retrieval.checkpoint
    result = evaluate_split(model, PrecompDataset("data/synth", "test"), tokenizer)
    print(format_table(result))

Memory: the image and caption embeddings of the split are held (images x regions + captions x
words, times d); the (n_images, n_captions) score matrix is filled one (image chunk x caption
chunk) block at a time, so the cross-attention never sees more than ``image_chunk`` x
``caption_chunk`` pairs at once. Each block goes through :meth:`MEFN.similarity` and therefore
through the backend the model names (``"auto"``: the fastest one available).

Under ``torchrun`` (a process group of several ranks, see :mod:`mefn_fast.retrieval.distributed`) the same
functions deal the embedding batches and the score-matrix row blocks out to the ranks and
all-gather the results; each block is computed as on one process, so the score matrix is the
same, bit for bit. :func:`topk_split` streams a gallery whose score matrix does not fit in memory
through :func:`mefn_fast.retrieval.topk.stream_topk`, keeping the best captions of each image and images of
each caption; :func:`pair_entropy_map` gives the entropy map of one image-caption pair of a split.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..model import MEFN, ImageEmbeddings, TextEmbeddings
from ..model.metrics import METRIC_KEYS, coco_1k_5fold, retrieval_metrics
from ..model.text import tokenize
from .data.datasets import CaptionDataset, ImageView, pad_images
from .runtime import autocast, progress_bar

# ------------------------------------------------------------------------------- distribution
def _dist(distributed: Optional[bool]):
    """The mefn_fast.retrieval.distributed module when this call is to be spread over a process group."""
    from . import distributed as d

    if distributed is None:
        distributed = d.is_distributed()
    if distributed and not d.is_distributed():
        raise RuntimeError("distributed=True needs an initialised process group of more than one rank")
    return d if distributed else None


def _my_batches(n: int, batch_size: int, d) -> list:
    """The (lo, hi) batches of range(n) that this rank embeds: all of them on one process; on
    several, contiguous runs of the very same batches (so every embedding is computed alike)."""
    batches = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if d is None:
        return batches
    ctx = d.context()
    return [batches[k] for k in d.shard_ranges(len(batches), ctx.world_size, ctx.rank)]


def _gather_embeddings(parts: tuple, d) -> tuple:
    """All-gather (padded (B, L, d), lengths (B,), vectors (B, d)) in rank order; padded to the longest L."""
    if d is None:
        return parts
    seq, lengths, vec = parts
    seqs = d.all_gather_variable(seq)
    return (d.cat_padded(seqs, dim=1), torch.cat(d.all_gather_variable(lengths)),
            torch.cat(d.all_gather_variable(vec)))


# ------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def encode_images(model: MEFN, dataset: CaptionDataset, *, batch_size: int = 128, device=None,
                  amp: str = "auto", workers: int = 0, progress: bool = False,
                  distributed: Optional[bool] = None) -> ImageEmbeddings:
    """Embeddings of the split's unique images, in order (regions padded to the longest).

    ``distributed`` (default: whenever a process group of several ranks exists): each rank embeds
    its share of the batches and the embeddings are all-gathered, the same on every rank."""
    device = device or next(model.parameters()).device
    d = _dist(distributed)
    mine = _my_batches(dataset.n_images, batch_size, d)
    loader = DataLoader(ImageView(dataset), batch_sampler=[list(range(lo, hi)) for lo, hi in mine],
                        num_workers=workers, collate_fn=pad_images, generator=torch.Generator())
    parts = []
    total = sum(hi - lo for lo, hi in mine)
    with progress_bar(progress and (d is None or d.context().is_main), total=total, desc="encode images", unit="img") as bar:
        for images, region_lengths in loader:
            with autocast(device, amp):
                e = model.encode_images(images.to(device), None if region_lengths is None else region_lengths.to(device))
            parts.append(e.to(torch.float32))
            bar.update(images.shape[0])
    return _concat_embeddings(ImageEmbeddings, parts, model.embed_dim, device, d)


@torch.no_grad()
def encode_captions(model: MEFN, captions, tokenizer, *, batch_size: int = 256, max_length: Optional[int] = 64,
                    device=None, amp: str = "auto", progress: bool = False,
                    distributed: Optional[bool] = None) -> TextEmbeddings:
    """Embeddings of a list of captions, in order (words padded to the longest caption);
    ``distributed`` as for :func:`encode_images`."""
    device = device or next(model.parameters()).device
    d = _dist(distributed)
    mine = _my_batches(len(captions), batch_size, d)
    parts = []
    total = sum(hi - lo for lo, hi in mine)
    with progress_bar(progress and (d is None or d.context().is_main), total=total, desc="encode captions",
               unit="cap") as bar:
        for lo, hi in mine:
            tok = tokenize(tokenizer, captions[lo:hi], max_length)
            with autocast(device, amp):
                e = model.encode_texts(tok["input_ids"].to(device), tok["attention_mask"].to(device),
                                       tok["special_tokens_mask"].to(device))
            parts.append(e.to(torch.float32))
            bar.update(hi - lo)
    return _concat_embeddings(TextEmbeddings, parts, model.embed_dim, device, d)


def _concat_embeddings(cls, parts: list, dim: int, device, d):
    """One rank's batches joined (``cls.cat``: padded to the widest), gathered over the ranks when ``d``."""
    if not parts:  # a rank with no batch
        parts = [cls(torch.zeros(0, 1, dim, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                     torch.zeros(0, dim, device=device))]
    return cls(*_gather_embeddings(tuple(cls.cat(parts)), d))


def _my_rows(n_img: int, image_chunk: int, d) -> tuple:
    """(lo, hi): the image rows this rank scores, whole ``image_chunk`` blocks dealt out in order."""
    if d is None:
        return 0, n_img
    ctx = d.context()
    blocks = d.shard_ranges(-(-n_img // image_chunk), ctx.world_size, ctx.rank)
    return min(blocks.start * image_chunk, n_img), min(blocks.stop * image_chunk, n_img)


@torch.no_grad()
def score_matrix(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings, *, image_chunk: int = 128,
                 caption_chunk: int = 640, amp: str = "auto", progress: bool = False,
                 distributed: Optional[bool] = None) -> torch.Tensor:
    """The (n_images, n_captions) float32 score matrix on the CPU, one block at a time
    (:meth:`MEFN.score_blocks`, under ``amp``, with a progress bar).

    Each block keeps only as many region and word slots as its longest item needs; padding never
    changes a score, so the result does not depend on the chunk sizes. ``distributed`` (default:
    whenever a process group of several ranks exists): the ``image_chunk`` row blocks are dealt
    out to the ranks and the rows all-gathered; every rank returns the whole matrix.
    """
    if image_chunk < 1 or caption_chunk < 1:
        raise ValueError(f"image_chunk and caption_chunk must be >= 1; got {image_chunk}, {caption_chunk}")
    d = _dist(distributed)
    if d is not None:
        lo, hi = _my_rows(img.regions.shape[0], image_chunk, d)
        if hi > lo:
            mine = score_matrix(model, img.rows(slice(lo, hi)),
                                txt, image_chunk=image_chunk, caption_chunk=caption_chunk, amp=amp,
                                progress=progress and d.context().is_main, distributed=False)
        else:
            mine = torch.zeros(0, txt.words.shape[0])
        dev = img.regions.device  # NCCL gathers device tensors
        return torch.cat([p.cpu() for p in d.all_gather_variable(mine.to(dev))])
    n_img, n_cap = img.regions.shape[0], txt.words.shape[0]
    out = torch.empty(n_img, n_cap, dtype=torch.float32)
    device = img.regions.device
    blocks = -(-n_img // image_chunk) * -(-n_cap // caption_chunk)
    with progress_bar(progress, total=blocks, desc="score", unit="block") as bar, autocast(device, amp):
        for (rows, cols), scores in model.score_blocks(img, txt, image_chunk=image_chunk, caption_chunk=caption_chunk):
            out[rows, cols] = scores.float().cpu()
            bar.update(1)
    return out


def chosen_backend(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings) -> str:
    """The backend that the model's local similarity runs on for these embeddings."""
    if not model.use_local:
        return "none (global branch only)"
    from ..backends import select_backend

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


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def embed_split(model: MEFN, dataset: CaptionDataset, tokenizer, *, batch_size: int, max_length: Optional[int],
                amp: str, workers: int, progress: bool, distributed: Optional[bool]):
    """The image and caption embeddings of a split (captions in batches twice as large)."""
    img = encode_images(model, dataset, batch_size=batch_size, amp=amp, workers=workers, progress=progress,
                        distributed=distributed)
    txt = encode_captions(model, dataset.captions, tokenizer, batch_size=2 * batch_size, max_length=max_length,
                          amp=amp, progress=progress, distributed=distributed)
    return img, txt


def evaluate_split(model: MEFN, dataset: CaptionDataset, tokenizer, *, batch_size: int = 128,
                   image_chunk: int = 128, caption_chunk: int = 640, max_length: Optional[int] = 64,
                   folds: int = 0, amp: str = "auto", workers: int = 0, progress: bool = False,
                   distributed: Optional[bool] = None) -> dict:
    """Embed, score and measure one split; returns metrics, sizes, backend, timings (and ``scores``).

    ``distributed`` (default: whenever a process group of several ranks exists): spread over the
    ranks, every rank returning the same result, equal to one process's."""
    t0 = time.perf_counter()
    with eval_mode(model):
        img, txt = embed_split(model, dataset, tokenizer, batch_size=batch_size, max_length=max_length, amp=amp,
                               workers=workers, progress=progress, distributed=distributed)
        t1 = time.perf_counter()
        scores = score_matrix(model, img, txt, image_chunk=image_chunk, caption_chunk=caption_chunk, amp=amp,
                              progress=progress, distributed=distributed)
        t2 = time.perf_counter()
        backend = chosen_backend(model, img, txt)
    result = {"n_images": dataset.n_images, "n_captions": len(dataset.captions), "backend": backend,
              "encode_seconds": t1 - t0, "score_seconds": t2 - t1}
    result["metrics"] = split_metrics(scores, dataset, folds)
    result["scores"] = scores
    return result


# ------------------------------------------------------------------------------- top-k at scale
def _block_scorer(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings, amp: str):
    """``(i0, i1, t0, t1) -> scores`` of one block (:meth:`MEFN.score_block`), as :func:`score_matrix` scores it."""
    device = img.regions.device

    @torch.no_grad()
    def block(i0: int, i1: int, t0: int, t1: int) -> torch.Tensor:
        with autocast(device, amp):
            return model.score_block(img, txt, slice(i0, i1), slice(t0, t1)).float().cpu()

    return block


def _merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple:
    """The k best of candidate lists concatenated in increasing index order (stable: the lower index wins a tie)."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(values, 1, order), torch.gather(indices, 1, order)


@torch.no_grad()
def topk_scores(model: MEFN, img: ImageEmbeddings, txt: TextEmbeddings, k: int = 10, *, image_chunk: int = 128,
                caption_chunk: int = 640, amp: str = "auto", progress: bool = False,
                distributed: Optional[bool] = None):
    """The top-k captions of each image and images of each caption, without the full score matrix.

    Blocks are scored as :func:`score_matrix` scores them and streamed through
    :func:`mefn_fast.retrieval.topk.stream_topk` (memory O(block + (images + captions) x k)); ties go to the
    lower index, so the result equals a stable descending sort of the full matrix. Distributed:
    each rank streams its ``image_chunk`` row blocks; the captions of each image are gathered and
    the ranks' image lists of each caption merged. Returns :class:`mefn_fast.retrieval.topk.StreamedTopK`
    (scores in float64, as ``stream_topk`` keeps them).
    """
    from .topk import StreamedTopK, TopK, stream_topk

    d = _dist(distributed)
    n_img, n_cap = img.regions.shape[0], txt.words.shape[0]
    lo, hi = _my_rows(n_img, image_chunk, d)
    score_block = _block_scorer(model, img, txt, amp)
    k_cap, k_img = min(k, n_cap), min(k, n_img)
    if hi > lo:
        res = stream_topk(lambda i0, i1, t0, t1: score_block(lo + i0, lo + i1, t0, t1), hi - lo, n_cap, k=k,
                          image_chunk=image_chunk, caption_chunk=caption_chunk,
                          progress=progress and (d is None or d.context().is_main))
        cap, img_k = res.captions_of_image, res.images_of_caption
        img_k = TopK(img_k.values, img_k.indices + lo)
    else:
        cap = TopK(torch.zeros(0, k_cap, dtype=torch.float64), torch.zeros(0, k_cap, dtype=torch.int64))
        img_k = TopK(torch.zeros(n_cap, 0, dtype=torch.float64), torch.zeros(n_cap, 0, dtype=torch.int64))
    if d is None:
        return StreamedTopK(cap, img_k)
    dev = img.regions.device
    gather = lambda x: [p.cpu() for p in d.all_gather_variable(x.to(dev))]  # noqa: E731
    cap = TopK(torch.cat(gather(cap.values)), torch.cat(gather(cap.indices)))
    values, indices = torch.cat(gather(img_k.values), dim=1), torch.cat(gather(img_k.indices), dim=1)
    return StreamedTopK(cap, TopK(*_merge_topk(values, indices, k_img)))


def topk_split(model: MEFN, dataset: CaptionDataset, tokenizer, k: int = 10, *, batch_size: int = 128,
               image_chunk: int = 128, caption_chunk: int = 640, max_length: Optional[int] = 64, amp: str = "auto",
               workers: int = 0, progress: bool = False, distributed: Optional[bool] = None) -> dict:
    """Embed a split and keep only the top-k of each row and column of its score matrix
    (:func:`topk_scores`); also the share of images (captions) whose top-K holds a match, K <= k
    (R@K with ties broken by the lower index rather than counted against the model)."""
    t0 = time.perf_counter()
    with eval_mode(model):
        img, txt = embed_split(model, dataset, tokenizer, batch_size=batch_size, max_length=max_length, amp=amp,
                               workers=workers, progress=progress, distributed=distributed)
        t1 = time.perf_counter()
        top = topk_scores(model, img, txt, k, image_chunk=image_chunk, caption_chunk=caption_chunk, amp=amp,
                          progress=progress, distributed=distributed)
        t2 = time.perf_counter()
    owner = torch.as_tensor(dataset.caption_image, dtype=torch.int64)
    hits = {}
    ci, ic = top.captions_of_image.indices, top.images_of_caption.indices
    for kk in (1, 5, 10):
        if kk <= ci.shape[1]:
            hits[f"i2t_r{kk}"] = 100.0 * float((owner[ci[:, :kk]] == torch.arange(ci.shape[0])[:, None])
                                               .any(1).double().mean())
        if kk <= ic.shape[1]:
            hits[f"t2i_r{kk}"] = 100.0 * float((ic[:, :kk] == owner[:, None]).any(1).double().mean())
    return {"n_images": dataset.n_images, "n_captions": len(dataset.captions), "k": k, "topk": top,
            "recall_ties_by_index": hits, "encode_seconds": t1 - t0, "score_seconds": t2 - t1}


def save_topk(top, path: str) -> str:
    """Write a :class:`~mefn_fast.retrieval.topk.StreamedTopK` to ``.npz``: ``captions_of_image`` /
    ``images_of_caption`` (indices, (n, k)) and ``*_scores`` (float64)."""
    import numpy as np

    np.savez(path, captions_of_image=top.captions_of_image.indices.numpy(),
             captions_of_image_scores=top.captions_of_image.values.numpy(),
             images_of_caption=top.images_of_caption.indices.numpy(),
             images_of_caption_scores=top.images_of_caption.values.numpy())
    return path


# ------------------------------------------------------------------------------- entropy map of a pair
@torch.no_grad()
def pair_entropy_map(model: MEFN, dataset: CaptionDataset, tokenizer, image: int, caption: int, *,
                     max_length: Optional[int] = 64, direction: Optional[str] = None):
    """The entropy map (:func:`mefn_fast.entropy_map`) of image ``image`` and caption ``caption`` of
    a split, from the model's own embeddings and with the model's options.

    ``direction``: "t2i" or "i2t" (default: the model's, "t2i" for a "both" model). Returns
    ``(maps, words, regions)``: the :class:`~mefn_fast.EntropyMap`, the caption's word tokens (the
    non-special tokens the model attends with, decoded) and region labels ``r0, r1, ...``.
    """
    from ..api import entropy_map

    if not 0 <= image < dataset.n_images:
        raise ValueError(f"image {image} is not in [0, {dataset.n_images})")
    if not 0 <= caption < len(dataset.captions):
        raise ValueError(f"caption {caption} is not in [0, {len(dataset.captions)})")
    device = next(model.parameters()).device
    with eval_mode(model):
        images, region_lengths = pad_images([dataset.image(image)])
        img = model.encode_images(images.to(device), None if region_lengths is None else region_lengths.to(device))
        tok = tokenize(tokenizer, [dataset.captions[caption]], max_length)
        txt = model.encode_texts(tok["input_ids"].to(device), tok["attention_mask"].to(device),
                                 tok["special_tokens_mask"].to(device))
    o = model.opts
    direction = direction or (o.direction if o.direction in ("t2i", "i2t") else "t2i")
    n, m = int(img.lengths[0]), int(txt.lengths[0])
    maps = entropy_map(img.regions[0].float(), txt.words[0].float(), region_length=n, word_length=m,
                       direction=direction, lambda_t2i=o.lambda_t2i, lambda_i2t=o.lambda_i2t, attn_norm=o.attn_norm,
                       mfe=o.mfe, tau=o.tau)
    is_word = tok["attention_mask"][0].bool() & ~tok["special_tokens_mask"][0].bool()
    ids = tok["input_ids"][0][is_word].tolist()
    words = tokenizer.convert_ids_to_tokens(ids) if ids else [tokenizer.convert_ids_to_tokens(
        int(tok["input_ids"][0][0]))]  # a caption without words attends with its [CLS] state
    if len(words) != m:
        raise RuntimeError(f"decoded {len(words)} words for a caption the model reads as {m}")
    return maps, words, [f"r{r}" for r in range(n)]


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


__all__ = ["encode_images", "encode_captions", "score_matrix", "split_metrics", "evaluate_split", "format_table",
           "topk_scores", "topk_split", "save_topk", "pair_entropy_map",
           "result_json", "METRIC_KEYS"]
