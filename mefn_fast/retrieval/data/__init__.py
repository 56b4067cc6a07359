"""Data for training and evaluating MEFN: SCAN's precomputed features, Karpathy-split JSON with
images, the synthetic "scenes" benchmark and collation (see each module). Tokenisation and the
text encoders are in :mod:`mefn_fast.model.text` and re-exported here."""
from .datasets import (Batch, CaptionDataset, DataError, ImageView, KarpathyDataset, PairCollate, PrecompDataset,
                       open_dataset, pad_images, timm_transform)
from .synth import SynthConfig, oracle_scores, write_synth
from ...model.text import load_tokenizer, minilm_path, resolve_text_encoder, tiny_text_config, tokenize

__all__ = ["Batch", "CaptionDataset", "DataError", "ImageView", "KarpathyDataset", "PairCollate", "PrecompDataset",
           "open_dataset", "pad_images", "timm_transform", "SynthConfig", "oracle_scores", "write_synth",
           "load_tokenizer", "minilm_path", "resolve_text_encoder", "tiny_text_config", "tokenize"]
