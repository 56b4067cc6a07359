"""The applications: training and evaluating image-text retrieval with :class:`mefn_fast.MEFN`.

- ``data/``: data sets (SCAN's precomputed features, Karpathy-split JSON with images, the
  synthetic "scenes"), collation;
- ``train.py``: :class:`~mefn_fast.retrieval.train.Trainer` and ``mefn-fast train``;
- ``evaluate.py``: embedding a split, the blocked score matrix, metrics, top-k, ``mefn-fast evaluate``;
- ``checkpoint.py``: training checkpoints and loading a trained model;
- ``runtime.py``: devices, mixed precision and progress bars;
- ``distributed.py``: several processes under ``torchrun``;
- ``topk.py``: streaming top-k over score blocks;
- ``ablation.py``: the paper's Table 3 on the synthetic scenes;
- ``heatmap.py``: the entropy heatmap of the paper's Figure 2.

This layer may import the model layer (``mefn_fast.model``) and the op layer; nothing in those
layers imports it.
"""
