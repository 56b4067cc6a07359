"""Training checkpoints and trained models on disk.

A run folder of ``mefn-fast train`` holds ``last.pt`` (the training checkpoint: model configuration
and weights, optimizer, scheduler, scaler and RNG states, the position in the epoch), ``best/`` (the
model selected on the dev split, as :meth:`mefn_fast.MEFN.save_pretrained` writes it, with
``train_state.json``) and ``tokenizer/``.
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np
import torch

from ..model import CONFIG_NAME, MEFN, TOKENIZER_DIR
from ..model.text import load_tokenizer

CHECKPOINT_FORMAT = "mefn_fast.train/1"


def checkpoint_path(path: str) -> str:
    """``last.pt`` of a run folder, or ``path`` itself when it names a file."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def load_trained(path: str, map_location="cpu", tokenizer: Optional[str] = None):
    """(model, tokenizer, training info) from what ``mefn-fast train`` wrote.

    ``path`` is a run folder (its ``best/`` model, else ``last.pt``), a model folder written by
    :meth:`MEFN.save_pretrained` (``config.json``, ``model.safetensors``, ``tokenizer/``) or a training
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
            raise FileNotFoundError(f"{path}: neither a model folder (config.json, model.safetensors), a run folder "
                                    "(best/ or last.pt) nor a checkpoint")
    if os.path.isdir(path):
        model = MEFN.from_pretrained(path, map_location=map_location)
        state_path = os.path.join(path, "train_state.json")
        if os.path.isfile(state_path):
            with open(state_path) as f:
                info = json.load(f)
        tok_dirs = [os.path.join(path, TOKENIZER_DIR), os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint")
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        info = {k: ckpt[k] for k in ("epoch", "step", "best_rsum", "train_config") if k in ckpt}
        tok_dirs = [os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    if tokenizer is None:
        found = [d for d in tok_dirs if os.path.isdir(d)]
        if not found:
            raise FileNotFoundError(f"no tokenizer saved beside {path} (looked in {', '.join(tok_dirs)}); pass one")
        tokenizer = found[0]
    return model, load_tokenizer(tokenizer), info


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :mod:`mefn_fast.retrieval.train` (plain tensors and Python values)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable mefn_fast training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a mefn_fast training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> MEFN:
    """The model of a training checkpoint (its configuration and weights)."""
    model = MEFN(**MEFN.config_kwargs(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.config = ckpt["model_config"]
    return model


def rng_state() -> dict:
    """Every random number generator's state (torch, CUDA, NumPy, Python), as plain tensors and values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
