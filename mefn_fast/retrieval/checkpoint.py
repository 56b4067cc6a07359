"""Training checkpoints and trained models on disk.

A run folder of ``mefn-fast train`` holds ``last.pt`` (the training checkpoint: model configuration
and weights, optimizer, scheduler, scaler and RNG states, the position in the epoch), ``best/`` (the
model selected on the dev split, as :meth:`mefn_fast.MEFN.save_pretrained` writes it, with
``train_state.json``) and ``tokenizer/``.

Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain Python values only),
model folders with :meth:`mefn_fast.MEFN.from_pretrained` (safetensors). A file that is missing, truncated, corrupted, of another format version or incomplete is a
``FileNotFoundError`` or ``ValueError`` that names the file and says what is wrong with it.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from typing import Optional

import numpy as np
import torch

from ..model import CONFIG_NAME, MEFN, TOKENIZER_DIR, WEIGHTS_NAME
from ..model.mefn import error_summary
from ..model.text import load_tokenizer

CHECKPOINT_NAME, CHECKPOINT_VERSION = "mefn_fast.train", 1
CHECKPOINT_FORMAT = f"{CHECKPOINT_NAME}/{CHECKPOINT_VERSION}"
# what every checkpoint of this format holds (the trainer writes more, optional, keys)
CHECKPOINT_KEYS = ("model_config", "model", "optimizer", "scheduler", "rng", "step", "epoch", "best_rsum", "history")
TRAIN_STATE_NAME = "train_state.json"


def load_torch_file(path: str, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a failure names ``path`` and what is wrong.

    ``what`` says what the file should be ("mefn_fast training checkpoint"). Never
    loads arbitrary Python objects: a file that holds some is refused, not retried unsafely.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a {what})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: not a readable {what}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            why = "it holds Python objects other than tensors and plain values, which are never loaded"
        else:
            why = f"truncated, corrupted or not written by torch.save ({error_summary(e)})"
        raise ValueError(f"{path}: not a readable {what}: {why}") from None


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or malformed file names itself."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"expected {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); expected {what}") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise ValueError(f"{path}: {what} must be a JSON object; got {kind}")
    return obj


def checkpoint_path(path: str) -> str:
    """``last.pt`` of a run folder, or ``path`` itself when it names a file."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def load_trained(path: str, map_location="cpu", tokenizer: Optional[str] = None):
    """(model, tokenizer, training info) from what ``mefn-fast train`` wrote.

    ``path`` is a run folder (its ``best/`` model, else ``last.pt``), a model folder written by
    :meth:`MEFN.save_pretrained` (``config.json``, ``model.safetensors``, ``tokenizer/``) or a training
    checkpoint ``.pt``. ``tokenizer`` overrides the saved tokenizer (a folder, vocab.txt or name).
    A missing or damaged file raises ``FileNotFoundError`` / ``ValueError`` naming it; a run
    folder whose ``best/`` is incomplete is an error, not a silent fall-back to ``last.pt``.
    """
    path = os.fspath(path)
    info: dict = {}
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run folder, model folder or checkpoint")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if os.path.isdir(os.path.join(path, "best")):
            path = os.path.join(path, "best")
        elif os.path.isfile(os.path.join(path, "last.pt")):
            path = os.path.join(path, "last.pt")
        elif not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise FileNotFoundError(f"{path}: neither a model folder ({CONFIG_NAME}, {WEIGHTS_NAME}), a run "
                                    "folder (best/ or last.pt) nor a checkpoint")
    if os.path.isdir(path):
        model = MEFN.from_pretrained(path, map_location=map_location)  # names a missing or damaged file
        state_path = os.path.join(path, TRAIN_STATE_NAME)
        if os.path.isfile(state_path):
            info = read_json_object(state_path, "the training state of the saved model")
        tok_dirs = [os.path.join(path, TOKENIZER_DIR), os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path)
        info = {k: ckpt[k] for k in ("epoch", "step", "best_rsum", "train_config") if k in ckpt}
        tok_dirs = [os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_DIR)]
    if tokenizer is None:
        found = [d for d in tok_dirs if os.path.isdir(d)]
        if not found:
            raise FileNotFoundError(f"no tokenizer saved beside {path} (looked in {', '.join(tok_dirs)}); pass one")
        tokenizer = found[0]
    return model, load_tokenizer(tokenizer), info


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :mod:`mefn_fast.retrieval.train` (plain tensors and Python values).

    Checks the format and its version and that every part of the training state is there.
    """
    ckpt = load_torch_file(path, "mefn_fast training checkpoint")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    name, _, version = fmt.partition("/") if isinstance(fmt, str) else ("", "", "")
    if name != CHECKPOINT_NAME:
        raise ValueError(f"{path}: not a mefn_fast training checkpoint (those have format {CHECKPOINT_FORMAT!r}; "
                         f"this has {fmt!r})")
    if version != str(CHECKPOINT_VERSION):
        by = "written by a newer" if version.isdigit() and int(version) > CHECKPOINT_VERSION else "unknown to this"
        raise ValueError(f"{path}: training checkpoint format {fmt!r}, {by} mefn_fast; this version reads "
                         f"{CHECKPOINT_FORMAT!r}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: incomplete training checkpoint: no {', '.join(missing)}")
    for key in ("model_config", "model"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"{path}: damaged training checkpoint: {key} is a {type(ckpt[key]).__name__}, not a dict")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str = "the training checkpoint") -> MEFN:
    """The model of a training checkpoint (its configuration and weights); ``path`` names it in errors."""
    try:
        model = MEFN(**MEFN.config_kwargs(ckpt["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model_config does not describe a MEFN model ({error_summary(e)})") from e
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its model weights do not fit its model_config ({error_summary(e)})") from e
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


def atomic_write_json(obj, path: str) -> None:
    """``json.dump`` (indented) to a temporary file, then rename, as :func:`atomic_save` does."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
