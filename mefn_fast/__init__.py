"""mefn_fast: fused kernels for MEFN's entropy-aware cross-attention image-text similarity.

Public API (SPEC section 5)::

    scores = mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, backend="auto")
    maps = mefn_fast.entropy_map(regions_i, words_t)          # A, h, H, w, MFE of one pair
    mefn_fast.available_backends()                           # see python -m mefn_fast.info
    model = mefn_fast.MEFN(...); loss = mefn_fast.TripletLoss(margin=0.2, max_violation=True)
    metrics = mefn_fast.retrieval_metrics(scores, captions_per_image=5)
"""
__version__ = "0.1.0"

from .api import EntropyMap, entropy_map, xattn_similarity
from .backends import available_backends, backend_status
from .losses import InfoNCELoss, TripletLoss
from .metrics import coco_1k_5fold, retrieval_metrics
from .model import MEFN
from .options import XAttnOptions, make_options

__all__ = [
    "xattn_similarity", "entropy_map", "EntropyMap", "available_backends", "backend_status",
    "MEFN", "TripletLoss", "InfoNCELoss", "retrieval_metrics", "coco_1k_5fold",
    "XAttnOptions", "make_options", "__version__",
]
