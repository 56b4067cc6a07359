"""The synthetic "scenes" benchmark: deterministic from a seed, written in SCAN's precomputed format.

Each image is a scene of a few objects. An object is a colour, a size and a shape ("a small red
triangle"); its region feature is the sum of one fixed random vector per concept (colour, size,
shape) plus Gaussian noise. The other regions of the image are background: one of a set of
background vectors that no word describes, plus noise. Each of the image's five captions
describes a random subset of its objects in English, with function words ("there is a small red
triangle next to a blue ring on a dark background"); sizes are mentioned only sometimes.

Concepts are shared between images (8 colours x 3 sizes x 8 shapes), so a caption is matched by
finding, for each of its words, the region that carries that concept, and by keeping colour,
size and shape bound to the same object: two images with a red square and a blue ring, or with a
blue square and a red ring, have the same set of concepts and the same mean region feature.

Knobs (:class:`SynthConfig`, the flags of ``mefn-fast synth``): images per split, regions per
image, feature dimension, objects per image, mentions per caption, noise, how often a size is
mentioned, and the seed. Each split has its own random stream, so changing the size of one split
leaves the others as they were. ``testall`` holds ``testall_folds`` folds of ``test`` size, the
first of which is ``test`` itself (as COCO's 5K test set holds the 1K one).

Files written to ``root``: ``{split}_ims.npy`` (n, regions, region_dim) float32,
``{split}_caps.txt`` (5 lines per image), ``vocab.txt`` (a BERT word-level vocabulary that covers
every caption, for a small text encoder trained from scratch) and ``synth.json`` (the knobs and
every scene's objects and every caption's mentions). With ``png=True`` also
``images/{split}/{index:06d}.png`` renderings and ``dataset_synth.json`` in the Karpathy format.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
SIZES = ("small", "medium", "large")
SHAPES = ("square", "circle", "triangle", "diamond", "ring", "cross", "bar", "star")
RGB = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230), "yellow": (235, 220, 30),
       "purple": (150, 40, 190), "orange": (245, 140, 20), "white": (250, 250, 250), "gray": (128, 128, 128)}
PREFIXES = ("", "there is", "this picture shows", "an image with", "we can see", "a photo of")
CONNECTORS = ("and", "next to", "with", "near", "beside", "and also")
SUFFIXES = ("", "", "on a dark background", "in the scene", "in this picture")
ARTICLES = ("a", "one", "the")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
N_BACKGROUNDS = 16


@dataclass
class SynthConfig:
    """Knobs of the scenes generator (each one a flag of ``mefn-fast synth``)."""

    seed: int = 0
    train: int = 2000  # images in the train split
    dev: int = 200
    test: int = 200
    testall_folds: int = 5  # testall = this many test-sized folds, the first one being test; 0: none
    regions: int = 12  # regions per image (objects + background)
    region_dim: int = 64  # feature dimension F
    min_objects: int = 2
    max_objects: int = 4
    min_mentions: int = 2  # objects a caption describes: uniform in [min(min_mentions, K), K]
    noise: float = 0.5  # std of the Gaussian noise, relative to a concept vector's norm (1)
    size_prob: float = 0.5  # probability that a caption mentions an object's size

    def validate(self) -> None:
        for name in ("train", "dev", "test", "testall_folds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.train + self.dev + self.test == 0:
            raise ValueError("all splits are empty")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects; got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.regions:
            raise ValueError(f"max_objects={self.max_objects} does not fit in regions={self.regions}")
        if self.max_objects > 9:
            raise ValueError("max_objects must be <= 9 (the rendered images place objects on a 3 x 3 grid)")
        if self.region_dim < 1:
            raise ValueError(f"region_dim must be >= 1; got {self.region_dim}")
        if self.min_mentions < 1:
            raise ValueError(f"min_mentions must be >= 1; got {self.min_mentions}")
        if not (self.noise >= 0 and np.isfinite(self.noise)):
            raise ValueError(f"noise must be a finite number >= 0; got {self.noise}")
        if not 0 <= self.size_prob <= 1:
            raise ValueError(f"size_prob must lie in [0, 1]; got {self.size_prob}")

    def split_sizes(self) -> dict:
        sizes = {"train": self.train, "dev": self.dev, "test": self.test}
        if self.testall_folds and self.test:
            sizes["testall"] = self.test * self.testall_folds
        return {k: v for k, v in sizes.items() if v > 0}


def vocabulary() -> list:
    """Every word the captions use, after the BERT special tokens (the order of ``vocab.txt``)."""
    words = set(COLOURS) | set(SIZES) | set(SHAPES) | {",", "."}
    for phrase in PREFIXES + CONNECTORS + SUFFIXES + ARTICLES:
        words.update(phrase.split())
    return list(SPECIAL_TOKENS) + sorted(words)


def _concepts(cfg: SynthConfig) -> dict:
    """The fixed random concept vectors (unit norm on average), shared by every split."""
    rng = np.random.default_rng([cfg.seed, 9999])
    scale = 1.0 / np.sqrt(cfg.region_dim)
    return {name: rng.standard_normal((n, cfg.region_dim)) * scale
            for name, n in (("colour", len(COLOURS)), ("size", len(SIZES)), ("shape", len(SHAPES)),
                            ("background", N_BACKGROUNDS))}


def _caption(rng: np.random.Generator, objects: list, cfg: SynthConfig) -> tuple:
    """One caption of a scene: (text, mentions), a mention being [colour, size or None, shape]."""
    k = len(objects)
    n = int(rng.integers(min(cfg.min_mentions, k), k + 1))
    chosen = rng.permutation(k)[:n]
    mentions, phrases = [], []
    for j in chosen:
        c, s, h = objects[j]
        with_size = bool(rng.random() < cfg.size_prob)
        mentions.append([c, s if with_size else None, h])
        article = ARTICLES[int(rng.integers(len(ARTICLES)))]
        words = [article] + ([SIZES[s]] if with_size else []) + [COLOURS[c], SHAPES[h]]
        phrases.append(" ".join(words))
    text = phrases[0]
    for p in phrases[1:]:
        text += " " + CONNECTORS[int(rng.integers(len(CONNECTORS)))] + " " + p
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    suffix = SUFFIXES[int(rng.integers(len(SUFFIXES)))]
    text = " ".join(x for x in (prefix, text, suffix) if x)
    if rng.random() < 0.5:
        text += " ."
    return text, mentions


def generate_split(cfg: SynthConfig, split: str, n_images: int, concepts: Optional[dict] = None) -> dict:
    """Features (n, regions, region_dim) float32, captions (5n strings) and the scenes of one split."""
    concepts = concepts if concepts is not None else _concepts(cfg)
    if split == "testall":  # fold 0 is the test split itself, the other folds are new scenes
        first = generate_split(cfg, "test", min(cfg.test, n_images), concepts)
        rest = generate_split(cfg, "testall_rest", n_images - len(first["objects"]), concepts) \
            if n_images > len(first["objects"]) else None
        if rest is None:
            return first
        return {"features": np.concatenate([first["features"], rest["features"]]),
                "captions": first["captions"] + rest["captions"],
                "objects": first["objects"] + rest["objects"], "mentions": first["mentions"] + rest["mentions"],
                "cells": first["cells"] + rest["cells"]}
    stream = {"train": 0, "dev": 1, "test": 2, "testall_rest": 3}[split]
    rng = np.random.default_rng([cfg.seed, stream])
    feats = np.empty((n_images, cfg.regions, cfg.region_dim), dtype=np.float32)
    noise_scale = cfg.noise / np.sqrt(cfg.region_dim)
    captions, all_objects, all_mentions, all_cells = [], [], [], []
    for i in range(n_images):
        k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        objects = [[int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))), int(rng.integers(len(SHAPES)))]
                   for _ in range(k)]
        slots = rng.permutation(cfg.regions)[:k]  # which regions hold the objects
        cells = rng.permutation(9)[:k]  # where the rendered picture draws them (3 x 3 grid)
        x = concepts["background"][rng.integers(N_BACKGROUNDS, size=cfg.regions)]
        for (c, s, h), r in zip(objects, slots):
            x[r] = concepts["colour"][c] + concepts["size"][s] + concepts["shape"][h]
        feats[i] = x + rng.standard_normal(x.shape) * noise_scale
        all_objects.append(objects)
        all_cells.append([int(r) for r in cells])
        ments = []
        for _ in range(CAPTIONS_PER_IMAGE):
            text, m = _caption(rng, objects, cfg)
            captions.append(text)
            ments.append(m)
        all_mentions.append(ments)
    return {"features": feats, "captions": captions, "objects": all_objects, "mentions": all_mentions,
            "cells": all_cells}


def oracle_scores(objects: list, mentions: list) -> np.ndarray:
    """(n_images, 5 n_images) scores of a perfect matcher: the fraction of a caption's mentions that
    the image holds (colour, shape and, when mentioned, size, bound to one object).

    Its retrieval metrics are the ceiling that the data allows: captions that mention few objects
    fit several images, and ties count against the matcher.
    """
    have = np.zeros((len(objects), len(COLOURS), len(SIZES), len(SHAPES)), dtype=bool)
    for i, objs in enumerate(objects):
        for c, s, h in objs:
            have[i, c, s, h] = True
    have_any_size = have.any(2)
    caps = [m for per_image in mentions for m in per_image]
    out = np.zeros((len(objects), len(caps)))
    for j, ments in enumerate(caps):
        for c, s, h in ments:
            out[:, j] += have_any_size[:, c, h] if s is None else have[:, c, s, h]
        out[:, j] /= len(ments)
    return out


# ---------------------------------------------------------------------------------- rendering
def render_scene(objects: list, cells: list, size: int = 96):
    """A PNG-ready picture of a scene: each object drawn in its cell of a 3 x 3 grid."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (20, 20, 28))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for (c, s, h), slot in zip(objects, cells):
        cx, cy = (slot % 3 + 0.5) * cell, (slot // 3 + 0.5) * cell
        r = cell / 2 * (0.45, 0.7, 0.95)[s]
        col = RGB[COLOURS[c]]
        shape = SHAPES[h]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "square":
            draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=col)
        elif shape == "circle":
            draw.ellipse(box, fill=col)
        elif shape == "ring":
            draw.ellipse(box, outline=col, width=max(1, int(r / 3)))
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
        elif shape == "cross":
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
        elif shape == "bar":
            draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=col)
        else:  # star
            pts = [(cx + (r if q % 2 == 0 else r / 2.5) * np.sin(q * np.pi / 5),
                    cy - (r if q % 2 == 0 else r / 2.5) * np.cos(q * np.pi / 5)) for q in range(10)]
            draw.polygon(pts, fill=col)
    return img


KARPATHY_SPLIT = {"train": "train", "dev": "val", "test": "test"}


def write_synth(root: str, cfg: Optional[SynthConfig] = None, png: bool = False, png_size: int = 96,
                progress: bool = False) -> dict:
    """Generate every split into ``root`` (see the module docstring); returns a summary per split."""
    cfg = cfg or SynthConfig()
    cfg.validate()
    os.makedirs(root, exist_ok=True)
    concepts = _concepts(cfg)
    vocab = vocabulary()
    with open(os.path.join(root, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    meta = {"generator": "mefn_fast.retrieval.data.synth", "config": dataclasses.asdict(cfg), "colours": COLOURS,
            "sizes": SIZES, "shapes": SHAPES, "captions_per_image": CAPTIONS_PER_IMAGE, "splits": {}}
    karpathy = {"dataset": "synth-scenes", "images": []}
    summary = {}
    for split, n in cfg.split_sizes().items():
        data = generate_split(cfg, split, n, concepts)
        np.save(os.path.join(root, f"{split}_ims.npy"), data["features"])
        with open(os.path.join(root, f"{split}_caps.txt"), "w") as f:
            f.write("\n".join(data["captions"]) + "\n")
        meta["splits"][split] = {"images": n, "objects": data["objects"], "cells": data["cells"],
                                 "mentions": data["mentions"]}
        summary[split] = {"images": n, "captions": len(data["captions"])}
        if png and split in KARPATHY_SPLIT:
            folder = os.path.join("images", split)
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            items = range(n)
            if progress:
                from tqdm import tqdm

                items = tqdm(items, desc=f"render {split}", unit="img")
            for i in items:
                name = f"{i:06d}.png"
                render_scene(data["objects"][i], data["cells"][i], png_size).save(os.path.join(root, folder, name))
                caps = data["captions"][CAPTIONS_PER_IMAGE * i:CAPTIONS_PER_IMAGE * (i + 1)]
                karpathy["images"].append({"filepath": folder, "filename": name, "split": KARPATHY_SPLIT[split],
                                           "imgid": len(karpathy["images"]),
                                           "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
    with open(os.path.join(root, "synth.json"), "w") as f:
        json.dump(meta, f)
    if png:
        with open(os.path.join(root, "dataset_synth.json"), "w") as f:
            json.dump(karpathy, f)
    return summary
