"""The paper's Table 3 on the synthetic scenes: every ablation, same seeds and budget (``mefn-fast ablation``).

    cfg = AblationConfig(out="runs/ablation", seeds=(0, 1, 2), epochs=2)
    result = run_ablation(cfg)                  # trains and evaluates every variant x seed
    print(format_markdown(result))              # mean +- std over the seeds

The variants are the switches of the model (docs/math.md, section 2) (:data:`VARIANTS`): the full MEFN, without MFE
(the plain mean over words), without the local cross-attention branch, without the global
branch, SCAN (no global branch, no MFE) and VSE++ (no local branch). docs/math.md defines the
VSE++-style model as ``use_local=False``, which is the "without local attention" model: the two
rows are one configuration, trained once per seed and reported on both rows (marked ``=``).
Every variant trains with the same data, seeds, steps, learning rate and loss (those of
:class:`mefn_fast.retrieval.train.TrainConfig` unless overridden), and is evaluated on the same split; the
JSON file keeps every run's metrics.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..model import VARIANTS as MODEL_VARIANTS

VARIANTS = tuple(MODEL_VARIANTS.values())  # (row label, switches), the rows of mefn_fast.create_model
TABLE_METRICS = (("i2t R@1", "i2t_r1"), ("i2t R@5", "i2t_r5"), ("i2t mAP", "i2t_map"),
                 ("t2i R@1", "t2i_r1"), ("t2i R@5", "t2i_r5"), ("t2i mAP", "t2i_map"), ("rsum", "rsum"))


def variant_key(switches: dict) -> str:
    """A name for the model a variant trains; MFE does not matter without the local branch."""
    mfe = switches["mfe"] and switches["use_local"]
    return ("local" if switches["use_local"] else "") + ("+global" if switches["use_global"] else "") \
        + ("+mfe" if mfe else "")


@dataclass
class AblationConfig:
    """The ablation's data, budget and seeds (each field a ``mefn-fast ablation`` flag)."""

    out: str = "runs/ablation"
    data: Optional[str] = None  # a SCAN precomputed folder; None: generate the synthetic scenes into out/data
    split: str = "test"
    seeds: Sequence[int] = (0, 1, 2)
    variants: Optional[Sequence[str]] = None  # names of VARIANTS to run (None: all)
    # synthetic data (when data is None)
    synth_seed: int = 0
    synth_train: int = 1000
    synth_test: int = 200
    synth_noise: float = 0.5
    # training budget, the same for every variant
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    warmup_epochs: int = 1
    embed_dim: int = 128
    text_hidden: int = 128
    text_layers: int = 2
    max_steps: Optional[int] = None
    threads: Optional[int] = None
    backend: str = "auto"
    train_options: dict = field(default_factory=dict)  # any other TrainConfig field
    progress: bool = False


def _std(xs) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def run_ablation(cfg: AblationConfig, log=print) -> dict:
    """Train and evaluate every variant for every seed; write ``out/ablation.json``; return it."""
    import torch

    from .data.datasets import PrecompDataset
    from .data.synth import SynthConfig, write_synth
    from .evaluate import evaluate_split
    from .train import TrainConfig, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise ValueError("at least one seed is needed")
    names = [n for n, _ in VARIANTS]
    chosen = list(cfg.variants) if cfg.variants else names
    unknown = [v for v in chosen if v not in names]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {names}")
    os.makedirs(cfg.out, exist_ok=True)
    data = cfg.data
    if data is None:
        data = os.path.join(cfg.out, "data")
        synth = SynthConfig(seed=cfg.synth_seed, train=cfg.synth_train, dev=0, test=cfg.synth_test, testall_folds=0,
                            noise=cfg.synth_noise)
        marker = os.path.join(data, "synth.json")
        same = False
        if os.path.isfile(marker):
            with open(marker) as f:
                same = json.load(f).get("config") == dataclasses.asdict(synth)
        if not same:
            log(f"generating the synthetic scenes into {data}")
            write_synth(data, synth, progress=False)
    test = PrecompDataset(data, cfg.split)

    t_start = time.perf_counter()
    runs: dict = {}  # variant key -> seed -> metrics
    rows = []
    for name in chosen:
        switches = dict(VARIANTS)[name]
        key = variant_key(switches)
        same_as = next((r["name"] for r in rows if r["key"] == key), None)
        if key not in runs:
            runs[key] = {}
            for seed in seeds:
                t0 = time.perf_counter()
                tcfg = TrainConfig(data=data, out=os.path.join(cfg.out, "runs", f"{key.strip('+')}_seed{seed}"),
                                   dev_split=None, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                   warmup_epochs=cfg.warmup_epochs, embed_dim=cfg.embed_dim,
                                   text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, max_steps=cfg.max_steps,
                                   threads=cfg.threads, backend=cfg.backend, seed=seed, progress=cfg.progress,
                                   **{**cfg.train_options, **switches})
                result = train(tcfg, log=lambda *_: None)
                res = evaluate_split(result["model"], test, result["tokenizer"], max_length=tcfg.max_length,
                                     progress=False)
                m = res["metrics"]["all"]
                runs[key][seed] = {"metrics": m, "train_seconds": result["seconds"],
                                   "seconds": time.perf_counter() - t0, "steps": result["step"]}
                log(f"{name:<28} seed {seed}: R@1 i2t {m['i2t_r1']:5.1f} t2i {m['t2i_r1']:5.1f}  mAP i2t "
                    f"{m['i2t_map']:5.1f} t2i {m['t2i_map']:5.1f}  rsum {m['rsum']:6.1f}  "
                    f"({time.perf_counter() - t0:.0f} s)")
        per_seed = [runs[key][s]["metrics"] for s in seeds]
        summary = {k: {"mean": float(np.mean([m[k] for m in per_seed])), "std": _std([m[k] for m in per_seed])}
                   for _, k in TABLE_METRICS}
        rows.append({"name": name, "key": key, "switches": switches, "same_as": same_as, "summary": summary,
                     "per_seed": {str(s): runs[key][s] for s in seeds}})
    result = {"data": data, "split": cfg.split, "n_images": test.n_images, "n_captions": len(test.captions),
              "seeds": seeds, "config": dataclasses.asdict(cfg), "rows": rows,
              "seconds": time.perf_counter() - t_start}
    result["config"]["seeds"] = seeds
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_markdown(result: dict) -> str:
    """The table: one row per variant, mean +- sample std over the seeds of each metric."""
    head = "| variant | " + " | ".join(c for c, _ in TABLE_METRICS) + " |"
    lines = [f"{result['split']} split: {result['n_images']} images x {result['n_captions']} captions, "
             f"mean ± std over seeds {', '.join(map(str, result['seeds']))}",
             "", head, "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for row in result["rows"]:
        s = row["summary"]
        cells = [f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}" for _, k in TABLE_METRICS]
        name = row["name"] + (f" (= {row['same_as']})" if row["same_as"] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["VARIANTS", "AblationConfig", "run_ablation", "format_markdown", "variant_key"]
