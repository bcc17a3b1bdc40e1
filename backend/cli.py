"""The ``segmask`` command: train, evaluate and inspect models (serving commands join as they land)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# glibc returns freed activations to the OS and faults them back in on every pass; keeping them mapped is
# worth 1.5-3x on CPU (targets.md). The variables only act at process start, hence the re-exec below.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def ensure_allocator_env(argv: list[str]) -> None:
    """Re-exec this command once with :data:`ALLOCATOR_ENV` set, unless it already is."""
    if all(k in os.environ for k in ALLOCATOR_ENV):
        return
    env = {**os.environ, **ALLOCATOR_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "backend.cli", *argv], env)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model stage on COCO-format data")
    p.add_argument("stage", choices=["deepmask", "sharpmask"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with instances.json and images/")
    p.add_argument("--out", type=Path, required=True, help="output directory (resumes when it holds a state)")
    p.add_argument("--init", type=Path, help="checkpoint to start from (required for sharpmask)")
    p.add_argument("--backbone", default="mobilenet_v2", choices=["mobilenet_v2", "resnet50"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--trunk-trainable-from", default="s16", help="first trainable trunk tap (deepmask); 'none'")
    p.add_argument("--no-augment", action="store_true", help="disable flips and photometric jitter")
    p.add_argument("--compact", action="store_true", help="store large weights as float16 (shipped models)")


def run_train(args: argparse.Namespace) -> None:
    from segmodels.train import TrainConfig, train

    cfg = TrainConfig(
        stage=args.stage, data=str(args.data), out=str(args.out), init=str(args.init) if args.init else None,
        backbone=args.backbone, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        trunk_trainable_from=None if args.trunk_trainable_from == "none" else args.trunk_trainable_from,
        augment=not args.no_augment, compact=args.compact,
    )
    print(train(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    return parser


COMMANDS = {"train": run_train}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ensure_allocator_env(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
