"""Training and evaluating on several processes with ``torch.distributed`` (launched by ``torchrun``).

    torchrun --nproc-per-node 2 -m mefn_fast.cli train --data data/synth --batch-size 32 ...
    torchrun --nproc-per-node 2 -m mefn_fast.cli evaluate runs/synth --data data/synth --split testall

Both commands notice ``WORLD_SIZE`` > 1 in the environment that ``torchrun`` sets and join the
process group (gloo on the CPU, NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``).

Training (:class:`DistributedTrainStep`, wrapped in ``DistributedDataParallel``): every rank takes
``batch_size`` pairs of each global batch of ``batch_size x world_size`` pairs (the batches of the
one-process run with that global batch size, split in rank order). With ``gather_negatives`` (the
default) each rank all-gathers the image and caption embeddings of the other ranks, so that the
hardest negatives come from the global batch: rank r scores its own images against every caption
and every image against its own captions, and its loss is the part of VSE++'s triplet loss (a sum
over the batch) that belongs to its rows and columns; the ranks' losses sum to the global batch's
loss. The gather carries gradients back to the rank that owns each embedding
(:func:`all_gather_with_grad`: the backward sums the gradients of every rank and keeps the local
slice), and the loss is multiplied by the world size before ``backward`` because DDP averages the
gradients of the ranks: the step then sees exactly the gradient of the global batch's loss, and
the weights follow the one-process run up to floating-point rounding. Without
``gather_negatives`` each rank's negatives come from its own batch only (cheaper: no
world-size-times-larger score blocks) and the gradient is the sum of the ranks' gradients.

Evaluation (:func:`mefn_fast.retrieval.evaluate.evaluate_split` with a process group): the images and the
captions are embedded in the same batches as on one process, the batches dealt out to the ranks
and the embeddings all-gathered (padded to a common length); the score-matrix rows are dealt out
in ``image_chunk`` blocks and all-gathered. Every block is computed exactly as on one process, so
the result is identical to the one-process score matrix, bit for bit.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def context() -> DistContext:
    """The current process group's rank and size (rank 0 of 1 without one)."""
    if not is_distributed():
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``device``: "auto" gives ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``backend``:
    "auto" gives NCCL for CUDA devices and gloo otherwise. Without ``WORLD_SIZE`` > 1 nothing is
    initialised and the context is rank 0 of 1 on ``device``.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() and world > 1 else
                           "cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device(f"cuda:{local_rank}")
    if world <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       initialized_here=created)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if :func:`setup` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ------------------------------------------------------------------------------- collectives
class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (equal sizes); the backward sums every rank's gradient and keeps
    this rank's slice (a reduce-scatter written with all_reduce, which gloo supports)."""

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        parts[rank] = x  # the same values; keeps the gathered tensor on this rank's own data
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over the ranks along dim 0, in rank order;
    gradients flow back to each rank's own part (summed over the ranks' losses)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_gather_variable(x: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's ``x`` (same number of dimensions and dtype, any shape), in rank order, without
    gradients: padded to the largest shape for the collective and cut back after."""
    if not is_distributed():
        return [x]
    world = dist.get_world_size()
    shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    big = tuple(max(s[d] for s in shapes) for d in range(x.dim()))
    padded = x.new_zeros(big)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return [p[tuple(slice(0, n) for n in s)] for p, s in zip(parts, shapes)]


def cat_padded(parts: List[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Concatenate along dim 0 after zero-padding dimension ``dim`` to the longest part."""
    n = max(p.shape[dim] for p in parts)
    out = []
    for p in parts:
        if p.shape[dim] < n:
            pad = [0, 0] * (p.dim() - 1 - dim) + [0, n - p.shape[dim]]
            p = torch.nn.functional.pad(p, pad)
        out.append(p)
    return torch.cat(out, dim=0)


def all_reduce_sum(value: float, device=None) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_ranges(n_units: int, world: int, rank: int) -> range:
    """The contiguous units of ``range(n_units)`` that rank ``rank`` of ``world`` takes (the first
    ``n_units % world`` ranks take one more)."""
    base, extra = divmod(n_units, world)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))


# ------------------------------------------------------------------------------- training
def triplet_rows_cols(rows: torch.Tensor, cols: torch.Tensor, offset: int, ids: torch.Tensor,
                      local_ids: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """The part of VSE++'s triplet loss owned by the local pairs ``offset .. offset + b`` of a global batch.

    ``rows``: (b, B) scores of the local images against every caption; ``cols``: (B, b) scores of
    every image against the local captions; ``ids``: (B,) image ids of the global batch,
    ``local_ids`` its local slice. Summing this over the ranks gives
    :class:`mefn_fast.TripletLoss` of the (B, B) global matrix.
    """
    b = rows.shape[0]
    idx = torch.arange(b, device=rows.device)
    pos_row = rows[idx, offset + idx]  # s(i, i) for the local pairs
    pos_col = cols[offset + idx, idx]
    same_row = local_ids[:, None] == ids[None, :]  # (b, B) never negatives
    same_col = ids[:, None] == local_ids[None, :]  # (B, b)
    cost_caption = (margin + rows - pos_row[:, None]).clamp(min=0).masked_fill(same_row, 0)
    cost_image = (margin + cols - pos_col[None, :]).clamp(min=0).masked_fill(same_col, 0)
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


class DistributedTrainStep(nn.Module):
    """One rank's loss on its part of a global batch (wrap in ``DistributedDataParallel``).

    ``forward`` returns this rank's share of the global batch's triplet loss (see the module
    docstring); the caller multiplies it by the world size before ``backward`` so that DDP's
    averaged gradient is the gradient of the global batch's loss.
    """

    def __init__(self, model: nn.Module, margin: float = 0.2, max_violation: bool = True,
                 gather_negatives: bool = True):
        super().__init__()
        self.model = model
        self.margin, self.max_violation, self.gather_negatives = float(margin), bool(max_violation), gather_negatives

    def forward(self, images, region_lengths, input_ids, attention_mask, special_tokens_mask, image_ids,
                hardest: Optional[bool] = None):
        from ..model import ImageEmbeddings, TextEmbeddings

        m = self.model
        hardest = self.max_violation if hardest is None else hardest
        img = m.encode_images(images, region_lengths)
        txt = m.encode_texts(input_ids, attention_mask, special_tokens_mask)
        if not (self.gather_negatives and is_distributed()):
            scores = m.similarity(img, txt).float()
            return triplet_rows_cols(scores, scores, 0, image_ids, image_ids, self.margin, hardest)
        b, rank = images.shape[0], dist.get_rank()
        # a common word length for the gather (padding never changes a score)
        m_local = torch.tensor([txt.words.shape[1]], device=txt.words.device)
        dist.all_reduce(m_local, op=dist.ReduceOp.MAX)
        words = torch.nn.functional.pad(txt.words, (0, 0, 0, int(m_local) - txt.words.shape[1]))
        n_local = torch.tensor([img.regions.shape[1]], device=img.regions.device)
        dist.all_reduce(n_local, op=dist.ReduceOp.MAX)
        regions = torch.nn.functional.pad(img.regions, (0, 0, 0, int(n_local) - img.regions.shape[1]))
        g_img = ImageEmbeddings(all_gather_with_grad(regions), all_gather_with_grad(img.lengths),
                                all_gather_with_grad(img.global_))
        g_txt = TextEmbeddings(all_gather_with_grad(words), all_gather_with_grad(txt.lengths),
                               all_gather_with_grad(txt.cls))
        ids = all_gather_with_grad(image_ids)
        rows = m.similarity(img, g_txt).float()  # (b, B)
        cols = m.similarity(g_img, txt).float()  # (B, b)
        return triplet_rows_cols(rows, cols, rank * b, ids, image_ids, self.margin, hardest)


def wrap_ddp(step: DistributedTrainStep, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around the step (parameters unused by an ablation are allowed)."""
    from torch.nn.parallel import DistributedDataParallel

    model = step.model
    unused = not (model.use_local and model.use_global)
    kw = dict(device_ids=[device.index if device.index is not None else 0]) if device.type == "cuda" else {}
    return DistributedDataParallel(step, find_unused_parameters=unused, **kw)


__all__ = ["DistContext", "setup", "cleanup", "context", "is_distributed", "barrier", "all_gather_with_grad",
           "all_gather_variable", "cat_padded", "all_reduce_sum", "all_gather_object", "shard_ranges",
           "triplet_rows_cols", "DistributedTrainStep", "wrap_ddp", "env_world_size"]
