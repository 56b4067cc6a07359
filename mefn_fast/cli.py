"""The ``mefn-fast`` command: ``synth``, ``train``, ``evaluate``, ``info`` (``mefn-fast CMD --help``).

Subcommands live in :data:`COMMANDS` (name -> (help, add_arguments, run)), filled by
:func:`register` calls at the end of this module; the benchmark suite's ``bench`` is one more call.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

COMMANDS: dict = {}


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
    from .data.synth import SynthConfig

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
    p.add_argument("--png-size", type=int, default=96, help="side of the rendered PNG images in pixels")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _synth_run(args) -> int:
    from .data.synth import SynthConfig, oracle_scores, write_synth
    from .metrics import retrieval_metrics

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
    from .train import TrainConfig

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
    from .train import TrainConfig

    values: dict = {}
    if getattr(args, "config", None):
        try:
            with open(args.config) as f:
                values = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"mefn-fast train: {args.config}: cannot read the JSON config ({e})")
        if not isinstance(values, dict):
            raise SystemExit(f"mefn-fast train: {args.config}: expected a JSON object of options")
        values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"mefn-fast train: {e}")


def _train_run(args) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    result = train(cfg)
    return 0 if result["step"] > 0 or cfg.resume else 1


# ---------------------------------------------------------------------------------- evaluate
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder of 'mefn-fast train' (its best/ model), a model folder "
                                      "(config.json, weights.pt) or a checkpoint last.pt")
    p.add_argument("--data", required=True, help="SCAN precomputed folder or Karpathy-split JSON file")
    p.add_argument("--split", default="test", help="split to evaluate (train, dev, test, testall)")
    p.add_argument("--image-root", help="images of a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--folds", default="auto",
                   help="also report the mean over this many equal folds (COCO 1K: 5 on the 5000-image testall); "
                        "'auto': 5 for testall, none otherwise; 0: none")
    p.add_argument("--backend", help="similarity backend (auto, reference, cpu, triton, cuda); default: the one "
                                     "the model was trained with")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch when embedding (captions: twice that)")
    p.add_argument("--image-chunk", type=int, default=128, help="images per block of the score matrix")
    p.add_argument("--caption-chunk", type=int, default=640, help="captions per block of the score matrix")
    p.add_argument("--max-length", type=int, help="caption truncation in tokens (default: the training value, else 64)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the one saved with the model")
    p.add_argument("--image-size", type=int, help="timm models: image side (default: the training value, else the "
                                                  "backbone's input size)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision on CUDA (never on the CPU)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes for the images")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    p.add_argument("--out", help="JSON file for the results (default: eval_{split}.json beside the model)")
    p.add_argument("--scores", help="also save the (images, captions) score matrix to this .npy file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _evaluate_run(args) -> int:
    import numpy as np

    from .data.datasets import open_dataset, timm_transform
    from .evaluate import evaluate_split, format_table, load_trained, resolve_device, result_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
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
    if args.folds == "auto":
        folds = 5 if args.split == "testall" and dataset.n_images % 5 == 0 else 0
    else:
        folds = int(args.folds)
    result = evaluate_split(model, dataset, tokenizer, batch_size=args.batch_size, image_chunk=args.image_chunk,
                            caption_chunk=args.caption_chunk, max_length=max_length, folds=folds, amp=args.amp,
                            workers=args.workers, progress=args.progress)
    title = (f"{args.checkpoint} on {args.data} [{args.split}]: {result['n_images']} images x "
             f"{result['n_captions']} captions, backend {result['backend']}, "
             f"{result['encode_seconds'] + result['score_seconds']:.1f} s")
    print(format_table(result, title))
    out = args.out
    if out is None:
        base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
        out = os.path.join(base, f"eval_{args.split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result_json(result, checkpoint=args.checkpoint, data=args.data, split=args.split,
                              trained=info.get("epoch")), f, indent=1)
    print(f"results: {out}")
    if args.scores:
        np.save(args.scores, result["scores"].numpy())
    return 0


# ---------------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    pass


def _info_run(args) -> int:
    from .info import report

    print(report())
    return 0


register("synth", "generate the synthetic 'scenes' data set (SCAN precomputed format, optional PNGs)",
         _synth_args, _synth_run)
register("train", "train MEFN on a SCAN precomputed folder or a Karpathy JSON", _train_args, _train_run)
register("evaluate", "retrieval metrics of a trained model on a split (R@K, medr, meanr, mAP, rsum)",
         _evaluate_args, _evaluate_run)
register("info", "versions, the extension build and the available similarity backends", _info_args, _info_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mefn-fast", description=__doc__.split("\n")[0],
                                     formatter_class=_Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mefn_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=_Formatter)
        add_arguments(p)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return COMMANDS[args.command][2](args) or 0


if __name__ == "__main__":
    sys.exit(main())
