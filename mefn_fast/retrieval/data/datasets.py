"""Image-caption data sets: SCAN's precomputed region features and Karpathy-split JSON with images.

Both are ``torch.utils.data.Dataset`` s of captions: item ``j`` is ``(image, caption, j, image_id)``
with ``image`` the caption's image (a (regions, F) feature tensor or a (3, H, W) image tensor) and
``image_id`` the id that tells which pairs in a batch share an image (never negatives of each
other). They also expose the unique images (``n_images``, :meth:`image`) and
``caption_image`` (the unique image of each caption) for evaluation. :class:`PairCollate` pads a
batch and tokenises its captions with the text encoder's tokenizer.

Bad files raise :class:`DataError` (a ``ValueError``) or ``FileNotFoundError`` naming the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...model.text import tokenize

SCAN_SPLITS = ("train", "dev", "test", "testall")


class DataError(ValueError):
    """A data file that exists but cannot be used; the message names the file."""


def _read_lines(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n").rstrip("\r") for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    while lines and not lines[-1].strip():  # a trailing blank line is not a caption
        lines.pop()
    return lines


class CaptionDataset(Dataset):
    """What both formats share: captions, their images and image ids."""

    captions: list
    caption_image: np.ndarray  # (n_captions,) index of each caption's unique image
    image_ids: np.ndarray  # (n_captions,) id used to keep same-image pairs out of the negatives
    n_images: int

    def image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, j: int):
        return self.image(int(self.caption_image[j])), self.captions[j], j, int(self.image_ids[j])

    @property
    def captions_per_image(self) -> Optional[int]:
        """k when caption j belongs to image j // k for every j (the standard layout), else None."""
        n = len(self.captions)
        if self.n_images == 0 or n % self.n_images:
            return None
        k = n // self.n_images
        return k if np.array_equal(self.caption_image, np.arange(n) // k) else None


class PrecompDataset(CaptionDataset):
    """SCAN's precomputed format: ``{root}/{split}_ims.npy`` (n, regions, F) float, memory-mapped;
    ``{split}_caps.txt``, one caption per line, ``im_div`` consecutive captions per image
    (``im_div`` = captions // images, 5 for COCO and Flickr30K; 1 when both counts are equal);
    optional ``{split}_ids.txt``, one image id per image or per caption (pairs with the same id are
    never negatives of each other, e.g. duplicated COCO images).
    """

    def __init__(self, root: str, split: str):
        self.root, self.split = os.fspath(root), split
        ims_path = os.path.join(self.root, f"{split}_ims.npy")
        caps_path = os.path.join(self.root, f"{split}_caps.txt")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: no such data folder")
        for path in (ims_path, caps_path):
            if not os.path.isfile(path):
                have = sorted({f.split("_")[0] for f in os.listdir(self.root) if f.endswith(("_ims.npy", "_caps.txt"))})
                raise FileNotFoundError(f"{path}: missing; split {split!r} of the SCAN precomputed format needs "
                                        f"{split}_ims.npy and {split}_caps.txt (splits found: {have or 'none'})")
        try:
            self.images = np.load(ims_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{ims_path}: not a readable .npy array ({e})") from e
        if self.images.ndim != 3 or not np.issubdtype(self.images.dtype, np.floating):
            raise DataError(f"{ims_path}: expected a float array (n_images, n_regions, feature_dim); "
                            f"got {self.images.dtype} {tuple(self.images.shape)}")
        self.n_images, self.n_regions, self.feature_dim = (int(x) for x in self.images.shape)
        if self.n_images == 0 or self.n_regions == 0 or self.feature_dim == 0:
            raise DataError(f"{ims_path}: empty array {tuple(self.images.shape)}")
        self.captions = _read_lines(caps_path)
        empty = [i + 1 for i, c in enumerate(self.captions) if not c.strip()]
        if empty:
            raise DataError(f"{caps_path}: line {empty[0]} is an empty caption")
        n_caps = len(self.captions)
        if n_caps == 0 or n_caps % self.n_images:
            raise DataError(f"{caps_path}: {n_caps} captions for the {self.n_images} images of {ims_path}; "
                            "the caption count must be a positive multiple of the image count")
        self.im_div = n_caps // self.n_images
        self.caption_image = np.arange(n_caps, dtype=np.int64) // self.im_div
        self.image_ids = self.caption_image.copy()
        ids_path = os.path.join(self.root, f"{split}_ids.txt")
        if os.path.isfile(ids_path):
            lines = _read_lines(ids_path)
            try:
                ids = np.array([int(x.strip()) for x in lines], dtype=np.int64)
            except ValueError as e:
                raise DataError(f"{ids_path}: every line must be an integer id ({e})") from e
            if len(ids) == self.n_images:
                self.image_ids = ids[self.caption_image]
            elif len(ids) == n_caps:
                self.image_ids = ids
            else:
                raise DataError(f"{ids_path}: {len(ids)} ids, neither one per image ({self.n_images}) "
                                f"nor one per caption ({n_caps})")

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i], dtype=np.float32))


KARPATHY_SPLITS = {"train": ("train",), "dev": ("val",), "val": ("val",), "test": ("test",),
                   "restval": ("restval",)}


class KarpathyDataset(CaptionDataset):
    """Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images[]`` with
    ``filename``, optional ``filepath``, ``split`` and ``sentences[].raw``; the image files under
    ``image_root`` (default: the JSON's folder), at ``image_root/filepath/filename``.

    Images are decoded with Pillow and transformed by ``transform`` (e.g. :func:`timm_transform`;
    default: to a float tensor). ``split`` is ``train`` (plus ``restval`` with ``restval=True``, as
    VSE++ trains on COCO), ``dev`` (= ``val``) or ``test``. The first ``captions_per_image``
    sentences of each image are used; an image with fewer is an error naming it (``None``: all).
    """

    def __init__(self, json_path: str, split: str, image_root: Optional[str] = None,
                 transform: Optional[Callable] = None, captions_per_image: Optional[int] = 5,
                 restval: bool = False):
        self.json_path = os.fspath(json_path)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"split={split!r}: a Karpathy JSON has the splits {sorted(KARPATHY_SPLITS)}")
        if not os.path.isfile(self.json_path):
            raise FileNotFoundError(f"{self.json_path}: no such Karpathy-split JSON file")
        try:
            with open(self.json_path, encoding="utf-8") as f:
                doc = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{self.json_path}: not valid JSON ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise DataError(f"{self.json_path}: expected an object with an 'images' list (Karpathy format)")
        self.image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(self.json_path))
        self.transform = transform
        wanted = KARPATHY_SPLITS[split] + (("restval",) if restval and split == "train" else ())
        self.paths, self.captions, owner = [], [], []
        for k, entry in enumerate(doc["images"]):
            try:
                if entry["split"] not in wanted:
                    continue
                path = os.path.join(self.image_root, entry.get("filepath", ""), entry["filename"])
                sents = [s["raw"] for s in entry["sentences"]]
            except (KeyError, TypeError) as e:
                raise DataError(f"{self.json_path}: images[{k}] lacks {e} (needs filename, split, sentences[].raw)") from e
            if captions_per_image is not None:
                if len(sents) < captions_per_image:
                    raise DataError(f"{self.json_path}: images[{k}] ({entry['filename']}) has {len(sents)} sentences, "
                                    f"fewer than captions_per_image={captions_per_image}")
                sents = sents[:captions_per_image]
            if not sents or not all(isinstance(s, str) and s.strip() for s in sents):
                raise DataError(f"{self.json_path}: images[{k}] ({entry['filename']}) has an empty or missing caption")
            owner += [len(self.paths)] * len(sents)
            self.paths.append(path)
            self.captions += sents
        if not self.paths:
            raise DataError(f"{self.json_path}: no image in split {split!r} (JSON split names: {'/'.join(wanted)})")
        self.n_images = len(self.paths)
        self.caption_image = np.array(owner, dtype=np.int64)
        self.image_ids = self.caption_image.copy()
        self.split = split

    def load_image(self, i: int):
        """The i-th image as an RGB ``PIL.Image`` (errors name the file)."""
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: image file missing (listed in {self.json_path})") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e

    def image(self, i: int) -> torch.Tensor:
        img = self.load_image(i)
        if self.transform is not None:
            return self.transform(img)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def timm_transform(model_or_name, train: bool = False, image_size: Optional[int] = None):
    """The eval (or train-time augmenting) transform that a ``timm`` backbone expects.

    ``model_or_name`` is a timm model (or :class:`mefn_fast.MEFN` with a timm image encoder) or a
    timm model name (then its default pretrained config is used, without downloading anything).
    ``image_size`` replaces the backbone's default input size (images resized to it, no crop).
    """
    import timm
    import timm.data

    if isinstance(model_or_name, str):
        model = timm.create_model(model_or_name, pretrained=False)
    else:
        enc = getattr(model_or_name, "image_encoder", model_or_name)
        model = getattr(enc, "backbone", enc)
    cfg = timm.data.resolve_model_data_config(model)
    if image_size:
        cfg.update(input_size=(3, image_size, image_size), crop_pct=1.0)
    return timm.data.create_transform(**cfg, is_training=train)


def open_dataset(data: str, split: str, image_root: Optional[str] = None, transform: Optional[Callable] = None,
                 restval: bool = False) -> CaptionDataset:
    """A SCAN precomputed folder or a Karpathy JSON file, told apart by the path."""
    data = os.fspath(data)
    if data.endswith(".json") or os.path.isfile(data):
        return KarpathyDataset(data, split, image_root=image_root, transform=transform, restval=restval)
    return PrecompDataset(data, split)


# ------------------------------------------------------------------------------- collation
def pad_images(images: Sequence[torch.Tensor]) -> tuple:
    """Stack images: (B, 3, H, W) raw images as they are (lengths ``None``: every patch is valid);
    (n_i, F) region features padded with zeros to (B, max n_i, F), with their lengths (B,)."""
    if images[0].dim() == 3:
        return torch.stack(list(images)), None
    lengths = torch.tensor([im.shape[0] for im in images], dtype=torch.int64)
    n = int(lengths.max())
    out = images[0].new_zeros((len(images), n, images[0].shape[-1]))
    for i, im in enumerate(images):
        out[i, :im.shape[0]] = im
    return out, lengths


@dataclass
class Batch:
    """A padded training batch of image-caption pairs (row i of each tensor is pair i)."""

    images: torch.Tensor  # (B, N, F) regions or (B, 3, H, W)
    region_lengths: Optional[torch.Tensor]  # (B,) or None (all regions valid)
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    special_tokens_mask: torch.Tensor  # (B, L)
    lengths: torch.Tensor  # (B,) tokens per caption, special tokens included
    indices: torch.Tensor  # (B,) caption index in the data set
    image_ids: torch.Tensor  # (B,) pairs with equal ids are never negatives

    def to(self, device) -> "Batch":
        return Batch(*(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
                       for x in (self.images, self.region_lengths, self.input_ids, self.attention_mask,
                                 self.special_tokens_mask, self.lengths, self.indices, self.image_ids)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class PairCollate:
    """``collate_fn`` for :class:`CaptionDataset` items: pads images, tokenises the captions."""

    def __init__(self, tokenizer, max_length: Optional[int] = 64):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items) -> Batch:
        images, captions, indices, ids = zip(*items)
        imgs, region_lengths = pad_images(images)
        tok = tokenize(self.tokenizer, captions, self.max_length)
        return Batch(imgs, region_lengths, tok["input_ids"], tok["attention_mask"], tok["special_tokens_mask"],
                     tok["lengths"], torch.tensor(indices, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64))


class ImageView(Dataset):
    """The unique images of a :class:`CaptionDataset` (for evaluation); collate with :func:`pad_images`."""

    def __init__(self, dataset: CaptionDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.n_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.image(i)
