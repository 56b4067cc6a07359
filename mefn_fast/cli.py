"""mefn-fast: benchmark the backends, make synthetic data, train, evaluate, draw entropy maps.

Commands: ``bench``, ``synth``, ``train``, ``evaluate``, ``heatmap``, ``ablation``, ``info``
(``mefn-fast CMD --help``); ``train`` and ``evaluate`` also run under ``torchrun``.

Subcommands live in :data:`COMMANDS` (name -> (help, add_arguments, run)), filled by
:func:`register` calls at the end of this module.

Errors: a user's mistake (a bad flag value, a missing or damaged file, a bad data folder or
checkpoint) prints one line ``mefn-fast: error: ...`` on stderr and exits with status 2; ``--debug``
shows its traceback instead. Any other exception is a bug: its traceback is printed, status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Callable, Optional

COMMANDS: dict = {}


class UsageError(Exception):
    """A mistake in the command line (not a bug): printed as ``mefn-fast: error: <message>``, status 2."""


# what a user's mistake raises (files and folders: OSError; bad values: ValueError / TypeError)
USER_ERRORS = (UsageError, ValueError, TypeError, OSError)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value
    return parse


positive_int, natural_int = _at_least(1), _at_least(0)


def _folds(text: str):
    return text if text == "auto" else natural_int(text)


def _read_options_json(path: str) -> dict:
    """A JSON file of options (flag names with '_' or '-'); errors name the file."""
    from .retrieval.checkpoint import read_json_object

    return {k.replace("-", "_"): v for k, v in read_json_object(path, "training options").items()}


def register(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    """Add a subcommand: ``add_arguments(parser)`` declares its flags, ``run(args)`` returns an exit code."""
    COMMANDS[name] = (help, add_arguments, run)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help unless X is None or the flag is a switch."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if (action.option_strings and action.default not in (None, argparse.SUPPRESS)
                and not isinstance(action.default, bool) and "(default" not in help_):
            help_ += " (default: %(default)s)"
        return help_


# ---------------------------------------------------------------------------------- synth
def _synth_args(p: argparse.ArgumentParser) -> None:
    from .retrieval.data.synth import SynthConfig

    d = SynthConfig()
    p.add_argument("out", help="folder to write the data set to (created if needed)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed; the same seed and knobs give the same files")
    p.add_argument("--train", type=int, default=d.train, help="images in the train split (5 captions each)")
    p.add_argument("--dev", type=int, default=d.dev, help="images in the dev split")
    p.add_argument("--test", type=int, default=d.test, help="images in the test split")
    p.add_argument("--testall-folds", type=int, default=d.testall_folds,
                   help="the testall split holds this many test-sized folds, the first being test (0: no testall)")
    p.add_argument("--regions", type=int, default=d.regions, help="regions per image (objects + background)")
    p.add_argument("--region-dim", type=int, default=d.region_dim, help="feature dimension of a region")
    p.add_argument("--min-objects", type=int, default=d.min_objects, help="fewest objects in an image")
    p.add_argument("--max-objects", type=int, default=d.max_objects, help="most objects in an image (<= 9)")
    p.add_argument("--min-mentions", type=int, default=d.min_mentions,
                   help="fewest objects a caption describes (capped by the image's objects)")
    p.add_argument("--noise", type=float, default=d.noise,
                   help="std of the noise added to every region, relative to a concept vector's norm")
    p.add_argument("--size-prob", type=float, default=d.size_prob,
                   help="probability that a caption mentions an object's size")
    p.add_argument("--png", action="store_true", help="also render the train/dev/test scenes as PNG images and "
                                                      "write dataset_synth.json (Karpathy format) for timm backbones")
    p.add_argument("--png-size", type=positive_int, default=96, help="side of the rendered PNG images in pixels")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _synth_run(args) -> int:
    from .retrieval.data.synth import SynthConfig, oracle_scores, write_synth
    from .model.metrics import retrieval_metrics

    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    t0 = time.perf_counter()
    summary = write_synth(args.out, cfg, png=args.png, png_size=args.png_size, progress=args.progress)
    for split, s in summary.items():
        print(f"{split:>8}: {s['images']} images, {s['captions']} captions -> "
              f"{os.path.join(args.out, split + '_ims.npy')} {(s['images'], cfg.regions, cfg.region_dim)}")
    with open(os.path.join(args.out, "synth.json")) as f:
        meta = json.load(f)["splits"]
    for split in ("test", "dev"):
        if split in meta:
            m = retrieval_metrics(oracle_scores(meta[split]["objects"], meta[split]["mentions"]))
            print(f"an exact-match oracle on {split} (ties count against it): R@1 i2t {m['i2t_r1']:.1f}, "
                  f"t2i {m['t2i_r1']:.1f}; chance R@1 {100 / meta[split]['images']:.1f}")
            break
    print(f"vocabulary for the 'tiny' text encoder: {os.path.join(args.out, 'vocab.txt')}"
          + (f"; images and {os.path.join(args.out, 'dataset_synth.json')}" if args.png else "")
          + f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------- train
def _field_type(f) -> type:
    t = str(f.type)
    return bool if "bool" in t else int if "int" in t else float if "float" in t else str


def _train_args(p: argparse.ArgumentParser) -> None:
    from .retrieval.train import TrainConfig

    p.add_argument("--config", help="JSON file of training options (the flag names with '_', e.g. "
                                    "{\"embed_dim\": 256}); flags given on the command line override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"] + ("" if f.default is None else " (default: %s)" % (f.default,))
        t = _field_type(f)
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_,
                           default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=f.name, type=t, choices=f.metadata.get("choices"), help=help_,
                           default=argparse.SUPPRESS, metavar=f.name.upper() if not f.metadata.get("choices") else None)


def train_config_from_args(args):
    from .retrieval.train import TrainConfig

    values: dict = _read_options_json(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{args.config}: {e}" if getattr(args, "config", None) else str(e)) from e


def _train_run(args) -> int:
    from .retrieval.train import train

    cfg = train_config_from_args(args)
    result = train(cfg)
    return 0 if result["step"] > 0 or cfg.resume else 1


# ---------------------------------------------------------------------------------- evaluate
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder of 'mefn-fast train' (its best/ model), a model folder "
                                      "(config.json, model.safetensors) or a checkpoint last.pt")
    p.add_argument("--data", required=True, help="SCAN precomputed folder or Karpathy-split JSON file")
    p.add_argument("--split", default="test", help="split to evaluate (train, dev, test, testall)")
    p.add_argument("--image-root", help="images of a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--folds", type=_folds, default="auto",
                   help="also report the mean over this many equal folds (COCO 1K: 5 on the 5000-image testall); "
                        "'auto': 5 for testall, none otherwise; 0: none")
    p.add_argument("--backend", help="similarity backend (auto, reference, cpu, triton, cuda); default: the one "
                                     "the model was trained with")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per batch when embedding (captions: twice that)")
    p.add_argument("--image-chunk", type=positive_int, default=128, help="images per block of the score matrix")
    p.add_argument("--caption-chunk", type=positive_int, default=640, help="captions per block of the score matrix")
    p.add_argument("--max-length", type=positive_int,
                   help="caption truncation in tokens (default: the training value, else 64)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the one saved with the model")
    p.add_argument("--image-size", type=positive_int,
                   help="timm models: image side (default: the training value, else the backbone's input size)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision on CUDA (never on the CPU)")
    p.add_argument("--workers", type=natural_int, default=0, help="data loader worker processes for the images")
    p.add_argument("--threads", type=positive_int, help="CPU threads of torch (default: torch's choice)")
    p.add_argument("--out", help="JSON file for the results (default: eval_{split}.json beside the model)")
    p.add_argument("--scores", help="also save the (images, captions) score matrix to this .npy file")
    p.add_argument("--topk", type=positive_int, metavar="K",
                   help="gallery too large for the score matrix: stream the blocks and keep only the K best captions "
                        "of each image and images of each caption (no full metrics; written to --topk-out)")
    p.add_argument("--topk-out", help="the .npz file of --topk: captions_of_image, images_of_caption (indices, "
                                      "best first, ties to the lower index) and their *_scores (default: "
                                      "topk_{split}.npz beside the model)")
    p.add_argument("--dist-backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="under torchrun: the process group's backend (auto: nccl on CUDA, gloo on the CPU); the "
                        "score-matrix rows are spread over the ranks and gathered, rank 0 reports")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _evaluate_run(args) -> int:
    from .retrieval import distributed as dist_

    ctx = dist_.setup(args.device, args.dist_backend) if dist_.env_world_size() > 1 else dist_.DistContext()
    try:
        return _evaluate(args, ctx)
    finally:
        dist_.cleanup(ctx)


def _evaluate(args, ctx) -> int:
    import numpy as np

    from .retrieval.data.datasets import open_dataset, timm_transform
    from .retrieval.checkpoint import load_trained
    from .retrieval.evaluate import evaluate_split, format_table, result_json, save_topk, topk_split
    from .retrieval.runtime import resolve_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = ctx.device if ctx.enabled else resolve_device(args.device)
    progress = args.progress and ctx.is_main
    if args.backend and args.backend != "auto":
        from .backends import get_backend

        get_backend(args.backend)  # an unknown name fails now, not after embedding the split
    model, tokenizer, info = load_trained(args.checkpoint, tokenizer=args.tokenizer)
    model.to(device)
    if args.backend:
        model.backend = args.backend
    train_cfg = info.get("train_config", {})
    max_length = args.max_length or train_cfg.get("max_length", 64)
    transform = None
    if model.config.get("image_encoder") == "timm":
        transform = timm_transform(model, image_size=args.image_size or train_cfg.get("image_size"))
    dataset = open_dataset(args.data, args.split, image_root=args.image_root, transform=transform)
    base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    procs = f", {ctx.world_size} processes" if ctx.enabled else ""
    if args.topk is not None:
        res = topk_split(model, dataset, tokenizer, args.topk, batch_size=args.batch_size,
                         image_chunk=args.image_chunk, caption_chunk=args.caption_chunk, max_length=max_length,
                         amp=args.amp, workers=args.workers, progress=progress)
        if not ctx.is_main:
            return 0
        out = args.topk_out or os.path.join(base, f"topk_{args.split}.npz")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_topk(res["topk"], out)
        hits = ", ".join(f"{k} {v:.1f}" for k, v in res["recall_ties_by_index"].items())
        print(f"{args.checkpoint} on {args.data} [{args.split}]: top-{args.topk} of {res['n_images']} images x "
              f"{res['n_captions']} captions{procs}, {res['encode_seconds'] + res['score_seconds']:.1f} s\n"
              f"R@K from the top-k lists (ties to the lower index): {hits or '-'}\ntop-k: {out}")
        return 0
    if args.folds == "auto":
        folds = 5 if args.split == "testall" and dataset.n_images % 5 == 0 else 0
    else:
        folds = args.folds
    result = evaluate_split(model, dataset, tokenizer, batch_size=args.batch_size, image_chunk=args.image_chunk,
                            caption_chunk=args.caption_chunk, max_length=max_length, folds=folds, amp=args.amp,
                            workers=args.workers, progress=progress)
    if not ctx.is_main:
        return 0
    title = (f"{args.checkpoint} on {args.data} [{args.split}]: {result['n_images']} images x "
             f"{result['n_captions']} captions, backend {result['backend']}{procs}, "
             f"{result['encode_seconds'] + result['score_seconds']:.1f} s")
    print(format_table(result, title))
    out = args.out
    if out is None:
        out = os.path.join(base, f"eval_{args.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result_json(result, checkpoint=args.checkpoint, data=args.data, split=args.split,
                              trained=info.get("epoch")), f, indent=1)
    print(f"results: {out}")
    if args.scores:
        np.save(args.scores, result["scores"].numpy())
    return 0


# ---------------------------------------------------------------------------------- heatmap
def _heatmap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder of 'mefn-fast train' (its best/ model), a model folder "
                                      "(config.json, model.safetensors) or a checkpoint last.pt")
    p.add_argument("--data", required=True, help="SCAN precomputed folder or Karpathy-split JSON file")
    p.add_argument("--split", default="test", help="split that holds the pair (train, dev, test, testall)")
    p.add_argument("--image", type=natural_int, default=0, help="index of the image in the split")
    p.add_argument("--caption", type=natural_int, help="index of the caption in the split (default: the image's first "
                                               "caption; any caption may be drawn against the image)")
    p.add_argument("--direction", choices=("t2i", "i2t"),
                   help="t2i: words query the regions (rows: regions, columns: words); i2t: the reverse "
                        "(default: the model's direction, t2i for a 'both' model)")
    p.add_argument("--out", help="PNG file (default: heatmap_{split}_{image}_{caption}.png beside the model)")
    p.add_argument("--numbers", help="also write the maps (A, h, H, H_norm, w, MFE, R, score, labels) to this JSON "
                                     "file (default: the PNG's name with .json)")
    p.add_argument("--dpi", type=positive_int, default=100, help="resolution of the PNG")
    p.add_argument("--image-root", help="images of a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--max-length", type=positive_int,
                   help="caption truncation in tokens (default: the training value, else 64)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the one saved with the model")
    p.add_argument("--threads", type=positive_int, help="CPU threads of torch (default: torch's choice)")


def _heatmap_run(args) -> int:
    from .retrieval.data.datasets import open_dataset, timm_transform
    from .retrieval.checkpoint import load_trained
    from .retrieval.evaluate import pair_entropy_map
    from .retrieval.heatmap import draw_entropy_map

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, info = load_trained(args.checkpoint, tokenizer=args.tokenizer)
    train_cfg = info.get("train_config", {})
    transform = timm_transform(model, image_size=train_cfg.get("image_size")) \
        if model.config.get("image_encoder") == "timm" else None
    dataset = open_dataset(args.data, args.split, image_root=args.image_root, transform=transform)
    caption = args.caption
    if caption is None:
        if not 0 <= args.image < dataset.n_images:
            raise UsageError(f"--image {args.image} is not in [0, {dataset.n_images})")
        caption = int(list(dataset.caption_image).index(args.image))
    maps, words, regions = pair_entropy_map(model, dataset, tokenizer, args.image, caption,
                                            max_length=args.max_length or train_cfg.get("max_length", 64),
                                            direction=args.direction)
    direction = args.direction or (model.opts.direction if model.opts.direction in ("t2i", "i2t") else "t2i")
    query, context = (words, regions) if direction == "t2i" else (regions, words)
    base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    out = args.out or os.path.join(base, f"heatmap_{args.split}_{args.image}_{caption}.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    match = int(dataset.caption_image[caption]) == args.image
    title = (f"{args.split} image {args.image}, caption {caption} ({'its own' if match else 'another image’s'}): "
             f"\"{dataset.captions[caption]}\"  [{direction}, mfe={model.opts.mfe}, pair score {float(maps.score):.3f}]")
    draw_entropy_map(maps, out, query_labels=query, context_labels=context, title=title, dpi=args.dpi)
    numbers = args.numbers or os.path.splitext(out)[0] + ".json"
    with open(numbers, "w") as f:
        json.dump({"split": args.split, "image": args.image, "caption": caption, "text": dataset.captions[caption],
                   "direction": direction, "query_labels": list(query), "context_labels": list(context),
                   **{k: v.tolist() for k, v in maps._asdict().items()}}, f, indent=1)
    print(f"entropy map of {args.split} image {args.image} x caption {caption} ({len(words)} words x "
          f"{len(regions)} regions, MFE {float(maps.MFE):.3f}): {out}  (numbers: {numbers})")
    return 0


# ---------------------------------------------------------------------------------- ablation
def _ablation_args(p: argparse.ArgumentParser) -> None:
    from .retrieval.ablation import VARIANTS, AblationConfig

    d = AblationConfig()
    p.add_argument("--out", default=d.out, help="folder for the runs, the generated data and ablation.json")
    p.add_argument("--data", help="SCAN precomputed folder with a train split and --split (default: generate the "
                                  "synthetic scenes into OUT/data)")
    p.add_argument("--split", default=d.split, help="split every variant is evaluated on")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="training seeds, the same for every "
                                                                               "variant")
    p.add_argument("--variants", nargs="+", choices=[n for n, _ in VARIANTS], metavar="NAME",
                   help="run only these rows (default: all: " + "; ".join(n for n, _ in VARIANTS) + ")")
    p.add_argument("--synth-seed", type=int, default=d.synth_seed, help="seed of the generated synthetic scenes")
    p.add_argument("--synth-train", type=int, default=d.synth_train, help="generated train images (5 captions each)")
    p.add_argument("--synth-test", type=int, default=d.synth_test, help="generated test images")
    p.add_argument("--synth-noise", type=float, default=d.synth_noise, help="noise of the generated region features")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs of every run")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="pairs per step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="first epochs with the sum over negatives, then the hardest")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="joint embedding dimension")
    p.add_argument("--text-hidden", type=int, default=d.text_hidden, help="'tiny' text encoder: hidden size")
    p.add_argument("--text-layers", type=int, default=d.text_layers, help="'tiny' text encoder: layers")
    p.add_argument("--max-steps", type=positive_int, help="stop every run after this many steps (a tiny budget)")
    p.add_argument("--backend", default=d.backend, help="similarity backend (auto, reference, cpu, triton, cuda)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads of torch (1 is often fastest for these small models)")
    p.add_argument("--train-config", help="JSON file of further 'mefn-fast train' options applied to every run "
                                          "(e.g. {\"tau\": 0.5})")
    p.add_argument("--markdown", help="also write the table to this file (default: OUT/ablation.md)")


def _ablation_run(args) -> int:
    from .retrieval.ablation import AblationConfig, format_markdown, run_ablation

    extra = _read_options_json(args.train_config) if args.train_config else {}
    cfg = AblationConfig(out=args.out, data=args.data, split=args.split, seeds=args.seeds, variants=args.variants,
                         synth_seed=args.synth_seed, synth_train=args.synth_train, synth_test=args.synth_test,
                         synth_noise=args.synth_noise, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_epochs=args.warmup_epochs, embed_dim=args.embed_dim, text_hidden=args.text_hidden,
                         text_layers=args.text_layers, max_steps=args.max_steps, threads=args.threads,
                         backend=args.backend, train_options=extra)
    result = run_ablation(cfg)
    table = format_markdown(result)
    print(table)
    md = args.markdown or os.path.join(args.out, "ablation.md")
    with open(md, "w") as f:
        f.write(table + "\n")
    print(f"({result['seconds']:.0f} s; every run: {os.path.join(args.out, 'ablation.json')}; table: {md})")
    return 0


# ---------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    pass


def _info_run(args) -> int:
    from .info import report

    print(report())
    return 0


# ---------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def _bench_run(args) -> int:
    from .bench import run

    return run(args)


register("synth", "generate the synthetic 'scenes' data set (SCAN precomputed format, optional PNGs)",
         _synth_args, _synth_run)
register("train", "train MEFN on a SCAN precomputed folder or a Karpathy JSON", _train_args, _train_run)
register("evaluate", "retrieval metrics of a trained model on a split (R@K, medr, meanr, mAP, rsum)",
         _evaluate_args, _evaluate_run)
register("heatmap", "the paper's Figure 2: a trained model's region x word entropy map of one image-caption pair, "
                    "to a PNG", _heatmap_args, _heatmap_run)
register("ablation", "the paper's Table 3 on the synthetic scenes: every ablation, same seeds and budget, "
                     "mean ± std", _ablation_args, _ablation_run)
register("info", "versions, the extension build and the available similarity backends", _info_args, _info_run)
register("bench", "benchmark every available backend against the reference and the matrix-product floor "
                  "(the named workloads of docs/math.md; --quick, --scaling)",
         _bench_args, _bench_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mefn-fast", description=__doc__.split("\n")[0],
                                     formatter_class=_Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mefn_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=_Formatter)
        add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the Python traceback")
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[list] = None) -> int:
    """Run ``mefn-fast``; returns the exit status (see the module docstring for errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mefn-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, USER_ERRORS) or type(e).__name__ == "OutOfMemoryError":
            print(f"mefn-fast: error: {_one_line(e)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"mefn-fast: internal error ({type(e).__name__}), a bug in mefn_fast: the traceback above says where",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
