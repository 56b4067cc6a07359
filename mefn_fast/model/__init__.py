"""The model layer: :class:`MEFN` and what trains and measures it.

- ``mefn.py``: the model (local cross-attention branch, global attention-pooling branch, fusion),
  its persistence;
- ``encoders.py``: image encoders (precomputed regions, ``timm``) and the text encoder builder;
- ``embeddings.py``: :class:`ImageEmbeddings` / :class:`TextEmbeddings`, what the encoders return;
- ``text.py``: text encoders and tokenizers found offline (the installed MiniLM, local folders,
  the small ``tiny`` BERT);
- ``losses.py``: VSE++'s triplet loss and CLIP's InfoNCE;
- ``metrics.py``: the retrieval metrics (R@K, medr, meanr, mAP, rsum, COCO 1K).

The math is in ``docs/math.md``. This layer imports the op layer (``mefn_fast.api``,
``mefn_fast.options``) and nothing above it: no ``mefn_fast.retrieval``, ``mefn_fast.bench`` or CLI.
"""
from .embeddings import ImageEmbeddings, TextEmbeddings
from .losses import InfoNCELoss, TripletLoss
from .mefn import CONFIG_NAME, MEFN, WEIGHTS_NAME
from .metrics import METRIC_KEYS, coco_1k_5fold, retrieval_metrics

__all__ = ["MEFN", "ImageEmbeddings", "TextEmbeddings", "TripletLoss", "InfoNCELoss", "retrieval_metrics",
           "coco_1k_5fold", "METRIC_KEYS", "CONFIG_NAME", "WEIGHTS_NAME"]
