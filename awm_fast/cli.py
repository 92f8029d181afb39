"""`awm-fast` command line: `awm-fast train [--config NAME|PATH] [--resume RUN|CKPT] [section.key=value ...]`.

Several processes: `torchrun --nproc_per_node N -m awm_fast.cli train ...` (every rank runs the same command;
rank 0 prints the report)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from awm_fast.config import ConfigError, list_presets, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awm-fast", description="Advantage Weighted Matching RL fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run the AWM loop (default: the embedded digits task, CPU, offline)")
    tr.add_argument("--config", default=None, help=f"YAML file or preset name ({', '.join(list_presets())})")
    tr.add_argument("--resume", default=None, help="run folder or checkpoint folder to continue from")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    cv = sub.add_parser("check-config", help="validate a config and print it (no work is done)")
    cv.add_argument("--config", default=None)
    cv.add_argument("overrides", nargs="*")
    sub.add_parser("presets", help="list the bundled presets")
    tiny = sub.add_parser("tiny-sd3", help="write a tiny random-weight SD3 pipeline (smoke tests of the SD3 path)")
    tiny.add_argument("path")
    return parser


def _report(summary_path) -> None:
    summary = json.loads(open(summary_path).read())
    before, after = summary["eval_before"], summary["eval_after"]
    for key in after:
        if key in before:
            print(f"{key}: {before[key]:.4f} -> {after[key]:.4f} ({after[key] - before[key]:+.4f})")
    if "accuracy" in after:
        rise = 100 * (after["accuracy"] - before["accuracy"])
        print(f"accuracy before {before['accuracy']:.1%}, after {after['accuracy']:.1%}: "
              f"{rise:+.1f} points in {summary['train_seconds']:.0f} s of training")
    print(f"summary: {summary_path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        print("\n".join(list_presets()))
        return 0
    if args.command == "tiny-sd3":
        from awm_fast.models.tiny import build_tiny_sd3

        print(build_tiny_sd3(args.path))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"awm-fast: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from diffusers.utils import logging as diffusers_logging

    from awm_fast.train.distributed import TrainingError
    from awm_fast.train.trainer import train

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices on every save are not actionable here

    rank = os.environ.get("RANK", "0")
    try:
        summary_path = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, TrainingError) as exc:
        where = f" (rank {rank})" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        print(f"awm-fast: error{where}: {exc}", file=sys.stderr, flush=True)
        return 1
    if rank == "0":
        _report(summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
