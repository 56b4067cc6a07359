"""A small demo on synthetic features: ``python -m mefn_fast.demo``.

Builds 8 "images" whose regions are noisy copies of object-concept vectors plus background
clutter, and 5 captions per image whose words are noisy copies of some of the image's concepts
plus function words ("a", "the", "of") that match no region. It scores every image against every
caption with ``xattn_similarity`` (each available CPU backend, timed), prints the retrieval
metrics with and without MFE, and for one pair prints each word's attention entropy and its MFE
weight under both attention normalisations.
"""
from __future__ import annotations

import argparse
import time

import torch

import mefn_fast

FUNCTION_WORDS = ("a", "the", "of")
CONCEPTS = ("red", "blue", "green", "small", "large", "dog", "cat", "ball", "tree", "car", "bike", "sky")


def synthetic_batch(n_images: int = 8, captions_per_image: int = 5, d: int = 64, seed: int = 0):
    """Regions (n, 6, d), words (5n, 6, d) with lengths, and the words of every caption."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]  # orthonormal: concepts and function words
    concept = {w: basis[i] for i, w in enumerate(CONCEPTS)}
    function = {w: basis[len(CONCEPTS) + i] for i, w in enumerate(FUNCTION_WORDS)}
    n_regions, m_max = 6, 6
    regions = torch.zeros(n_images, n_regions, d)
    words = torch.zeros(n_images * captions_per_image, m_max, d)
    word_lengths = torch.zeros(n_images * captions_per_image, dtype=torch.int64)
    texts = []
    for i in range(n_images):
        objs = [CONCEPTS[j] for j in torch.randperm(len(CONCEPTS), generator=g)[:4].tolist()]
        for r, o in enumerate(objs):
            regions[i, r] = concept[o] + 0.3 * torch.randn(d, generator=g) / d ** 0.5
        regions[i, 4:] = torch.randn(2, d, generator=g) / d ** 0.5  # background clutter
        for c in range(captions_per_image):
            picked = [objs[j] for j in torch.randperm(4, generator=g)[:3].tolist()]
            text = [FUNCTION_WORDS[c % 3], picked[0], picked[1], FUNCTION_WORDS[(c + 1) % 3], picked[2]]
            t = i * captions_per_image + c
            for k, w in enumerate(text):
                vec = concept[w] if w in concept else function[w]
                words[t, k] = vec + 0.3 * torch.randn(d, generator=g) / d ** 0.5
            word_lengths[t] = len(text)
            texts.append(text)
    return regions, words, word_lengths, texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="number of synthetic images (5 captions each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    parser.add_argument("--heatmap", metavar="PNG", default=None,
                        help="also draw the entropy map of image 0 vs caption 0 (the paper's Figure 2) to this PNG")
    args = parser.parse_args(argv)

    regions, words, word_lengths, texts = synthetic_batch(args.images, seed=args.seed)
    region_lengths = torch.full((args.images,), regions.shape[1])
    print(f"mefn_fast {mefn_fast.__version__}: {args.images} images x {words.shape[0]} captions, "
          f"{regions.shape[1]} regions, up to {words.shape[1]} words, d={regions.shape[2]}")
    print(f"backends available here: {', '.join(mefn_fast.available_backends())} (python -m mefn_fast.info says why not the rest)\n")

    results = {}
    for backend in [b for b in mefn_fast.available_backends() if b in ("reference", "cpu")]:
        mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, backend=backend)  # warm-up
        t0 = time.perf_counter()
        scores = mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, backend=backend)
        results[backend] = (scores, time.perf_counter() - t0)
    ref = results["reference"][0]
    for backend, (scores, seconds) in results.items():
        diff = float((scores - ref).abs().max())
        print(f"  {backend:<10} {seconds * 1e3:8.2f} ms   max |score - reference| = {diff:.2e}")

    print(f"\n{'attn_norm':<15} {'mfe':<6} {'i2t R@1':>8} {'t2i R@1':>8} {'t2i mAP':>8} {'rsum':>7}")
    for attn_norm in ("clipped_l2norm", "none"):
        for mfe in (False, True):
            scores = mefn_fast.xattn_similarity(regions, region_lengths, words, word_lengths, mfe=mfe, attn_norm=attn_norm)
            m = mefn_fast.retrieval_metrics(scores, captions_per_image=5)
            print(f"{attn_norm:<15} {str(mfe):<6} {m['i2t_r1']:8.1f} {m['t2i_r1']:8.1f} {m['t2i_map']:8.1f} {m['rsum']:7.1f}")

    t = 0
    for attn_norm in ("none", "clipped_l2norm"):
        maps = mefn_fast.entropy_map(regions[0], words[t], word_length=int(word_lengths[t]), attn_norm=attn_norm)
        print(f"\nimage 0 vs caption 0 \"{' '.join(texts[t])}\", attn_norm={attn_norm}: MFE = {float(maps.MFE):.3f}")
        print(f"  {'word':<8} {'max attention':>13} {'H / log n':>10} {'MFE weight':>11}")
        for k, w in enumerate(texts[t]):
            print(f"  {w:<8} {float(maps.A[:, k].max()):13.3f} {float(maps.H_norm[k]):10.3f} {float(maps.w[k]):11.3f}")
        is_function = torch.tensor([w in FUNCTION_WORDS for w in texts[t]])
        print(f"  mean weight: function words {float(maps.w[is_function].mean()):.3f}, "
              f"content words {float(maps.w[~is_function].mean()):.3f}")
    if args.heatmap:
        from .retrieval.heatmap import draw_entropy_map

        maps = mefn_fast.entropy_map(regions[0], words[t], word_length=int(word_lengths[t]), attn_norm="none")
        draw_entropy_map(maps, args.heatmap, texts[t], title="image 0 vs caption 0, attn_norm='none'")
        print(f"\nwrote {args.heatmap}")
    print("\nWith attn_norm='none' a function word, matching no region, spreads its attention (high entropy, low\n"
          "weight). SCAN's clipped_l2norm rescales each region's row over the words, which can make a function\n"
          "word attend sharply to a background region: the weights then follow that attention.")


if __name__ == "__main__":
    main()
