"""`awm-fast` command line.

    awm-fast train [--config NAME|PATH] [section.key=value ...]     train (default: the digits task, CPU)
    awm-fast train --resume RUN|CKPT [section.key=value ...]        continue a run with its own saved config
    awm-fast eval RUN|CKPT ... | --base                             evaluate (metrics JSON, per-prompt CSV, grids)
    awm-fast sample RUN|CKPT | --base --prompt TEXT --out DIR       images for given prompts
    awm-fast export RUN|CKPT --out DIR [--merged]                   LoRA file, merged pipeline folder
    awm-fast serve-reward NAME [--port P]                           a reward over HTTP (reward.name=http)
    awm-fast prompts fetch NAME|all | list                          the official prompt sets (official:NAME)
    awm-fast check-config | presets | tiny KIND PATH (KIND: a family with a diffusers pipeline, sd3, flux, ...)

Bad input (a path, an override, a reward, a resume that changes a non-resumable key) stops with one line and
exit code 2; a failure while working with one line and exit code 1; a training run stopped by SIGTERM / SIGINT
(after its current step, checkpointed: train/stop.py) with the resume command and exit code 143 / 130. Several
processes: `awm-fast train` starts one per visible GPU itself (run.nproc, awm_fast/train/launch.py); `torchrun
--nproc_per_node N -m awm_fast.cli train ...` as before (every rank runs the same command; rank 0 prints the report).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from awm_fast.config import ConfigError, list_presets, load_config
from awm_fast.families import PIPELINE_KINDS

COMMANDS = {"eval": "eval_cmd", "sample": "sample_cmd", "export": "export_cmd", "serve-reward": "serve_reward",
            "prompts": "prompts_cmd"}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (a missing argument, a value outside its choices) as one line and exit code 2, as every
    other bad input; `--help` still prints the whole usage."""

    def error(self, message: str):
        self.exit(2, f"awm-fast: error: {self.prog.removeprefix('awm-fast ')}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="awm-fast", description="Advantage Weighted Matching RL fine-tuning",
                                     epilog="`awm-fast COMMAND --help` describes each command")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run the AWM loop (default: the embedded digits task, CPU, offline)")
    tr.add_argument("--config", default=None, help=f"YAML file or preset name ({', '.join(list_presets())})")
    tr.add_argument("--resume", default=None, help="run folder (its newest checkpoint) or checkpoint folder to "
                                                   "continue, with the config saved there; overrides go on top")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    cv = sub.add_parser("check-config", help="validate a config and print it (no work is done)")
    cv.add_argument("--config", default=None)
    cv.add_argument("overrides", nargs="*")
    sub.add_parser("presets", help="list the bundled presets")
    tiny = sub.add_parser("tiny", help="write a tiny random-weight pipeline of a model family (smoke tests of its "
                                       "path without real weights)")
    tiny.add_argument("kind", choices=PIPELINE_KINDS, help="the model family (model.kind)")
    tiny.add_argument("path", help="the folder to write")
    for name in COMMANDS.values():
        importlib.import_module(f"awm_fast.commands.{name}").add_parser(sub)
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


def _error(exc: BaseException, code: int, where: str = "") -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"awm-fast: {'config error' if where == ' (config)' else 'error' + where}: {text}", file=sys.stderr,
          flush=True)
    return code


def _train_config(args):
    """The config to train with; on --resume the run's own, the overrides applied and every change logged."""
    if not args.resume:
        return load_config(args.config, args.overrides)
    from awm_fast.train.resume import resume_config

    if args.config:
        raise ConfigError(f"--config {args.config} with --resume: a resumed run continues with its own config "
                          f"(saved in {args.resume}); give only the overrides that change it (section.key=value)")
    cfg, changes, ckpt = resume_config(args.resume, args.overrides)
    args.resume = str(ckpt)  # the one resolved (a run folder's newest readable checkpoint), not resolved again
    if os.environ.get("RANK", "0") == "0":
        print(f"[resume] {ckpt} with its saved config" + (
            "; resuming with changed: " + ", ".join(str(c) for c in changes) if changes else ""), flush=True)
    return cfg


def _run_command(args) -> int:
    import importlib

    from awm_fast.commands.common import UsageError

    module = importlib.import_module(f"awm_fast.commands.{COMMANDS[args.command]}")
    try:
        return module.run(args)
    except (UsageError, ConfigError, FileNotFoundError) as exc:
        return _error(exc, 2)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        return _error(exc, 1)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's own handling (train/stop.py) or in another command
        print("awm-fast: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        print("\n".join(list_presets()))
        return 0
    if args.command == "tiny":
        from awm_fast.families import pipeline_family

        print(pipeline_family(args.kind).build_tiny(args.path))
        return 0
    if args.command not in ("train", "check-config"):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        return _run_command(args)
    from awm_fast.train.resume import NothingToResume

    try:
        cfg = _train_config(args) if args.command == "train" else load_config(args.config, args.overrides)
    except NothingToResume as exc:  # about the run folder, not the config
        return _error(exc, 2)
    except ConfigError as exc:
        return _error(exc, 2, " (config)")
    if args.command == "check-config":
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from awm_fast.train.launch import maybe_launch

    try:
        launched = maybe_launch(cfg, argv)  # several GPUs, not under torchrun: one process per GPU (run.nproc)
    except ConfigError as exc:
        return _error(exc, 2, " (config)")
    if launched is not None:
        return launched
    from diffusers.utils import logging as diffusers_logging

    from awm_fast.train.distributed import TrainingError
    from awm_fast.train.stop import Stopped
    from awm_fast.train.trainer import train

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices on every save are not actionable here

    rank = os.environ.get("RANK", "0")
    try:
        summary_path = train(cfg, resume=args.resume)
    except Stopped as exc:  # SIGTERM / SIGINT: stopped after a step, checkpointed; 128 + the signal's number
        if rank == "0":
            print(f"awm-fast: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (ValueError, OSError, TrainingError) as exc:  # OSError: a full disk (state_file.DiskFull), ...
        where = f" (rank {rank})" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
        return _error(exc, 1, where)
    if rank == "0":
        _report(summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
