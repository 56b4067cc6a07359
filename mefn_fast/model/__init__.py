"""The model layer: :class:`MEFN` and what trains and measures it.

- ``mefn.py``: the model (local cross-attention branch, global attention-pooling branch, fusion),
  its saved folders (``save_pretrained`` / ``from_pretrained``), blocked gallery scoring and the
  named variants of the paper's Table 3 (``create_model``);
- ``encoders.py``: image encoders (precomputed regions, ``timm``);
- ``embeddings.py``: :class:`ImageEmbeddings` / :class:`TextEmbeddings`, what the encoders return
  (joined over batches with ``.cat``);
- ``text.py``: text encoders and tokenizers found offline (``load_text_encoder``: the installed
  MiniLM, local folders, the small ``tiny`` BERT);
- ``losses.py``: VSE++'s triplet loss and CLIP's InfoNCE;
- ``metrics.py``: the retrieval metrics (R@K, medr, meanr, mAP, rsum, COCO 1K).

The math is in ``docs/math.md``. This layer imports the op layer (``mefn_fast.api``,
``mefn_fast.options``) and nothing above it: no ``mefn_fast.retrieval``, ``mefn_fast.bench`` or CLI.
"""
from .embeddings import ImageEmbeddings, TextEmbeddings
from .losses import InfoNCELoss, TripletLoss
from .mefn import CONFIG_NAME, FORMAT_VERSION, MEFN, TOKENIZER_DIR, VARIANTS, WEIGHTS_NAME, create_model
from .metrics import METRIC_KEYS, coco_1k_5fold, retrieval_metrics
from .text import DEFAULT_TEXT_ENCODER, load_text_encoder, load_tokenizer

__all__ = ["MEFN", "create_model", "VARIANTS", "ImageEmbeddings", "TextEmbeddings", "TripletLoss", "InfoNCELoss",
           "retrieval_metrics", "coco_1k_5fold", "load_text_encoder", "load_tokenizer", "DEFAULT_TEXT_ENCODER",
           "METRIC_KEYS", "CONFIG_NAME", "WEIGHTS_NAME", "TOKENIZER_DIR", "FORMAT_VERSION"]
