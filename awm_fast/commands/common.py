"""What the after-training commands share: where the weights come from (a run, a checkpoint or the base model),
the config they were trained with, loading them into a policy, and the raw / EMA weight choice.

A run folder means its newest checkpoint; a checkpoint folder is `<run>/checkpoints/step_NNNNNN`. Its config is
the one saved with it (train/resume.py), command-line overrides on top; `--base` takes `--config` + overrides.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from awm_fast.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad input on the command line (a path, a reward, an option): one line, exit code 2."""


@dataclass
class Source:
    """The weights a command works on: `ckpt` None means the base model (fresh LoRA adapters, a zero delta)."""

    cfg: Config
    ckpt: Path | None = None
    label: str = "base"
    step: int | None = None

    @property
    def is_base(self) -> bool:
        return self.ckpt is None


def resolve(path: str) -> Path:
    """A checkpoint folder from a run or checkpoint path; UsageError when there is none."""
    from awm_fast.train import checkpoint as ckpt_io  # here, not at the top: `awm-fast --help` stays light

    if not Path(path).exists():
        raise UsageError(f"no such run or checkpoint folder: {path}")
    try:
        return ckpt_io.resolve_checkpoint(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None


def add_source_arguments(parser, what: str, *, several: bool = False, base: bool = True) -> None:
    """The positional RUN|CKPT|section.key=value items every command takes, and --base/--config."""
    folders = ("run folders (newest checkpoint) or checkpoint folders, and overrides on top of the run's config"
               if several else "a run folder (newest checkpoint) or checkpoint folder, and overrides on top of its config")
    parser.add_argument("items", nargs="*", metavar="RUN|CKPT|section.key=value",
                        help=f"{folders} (e.g. run.device=cpu)")
    if base:
        parser.add_argument("--base", action="store_true", help=f"{what} the untrained model of --config")
        parser.add_argument("--config", default=None, help="with --base: YAML file or preset name")


def split_positionals(items: list[str]) -> tuple[list[str], list[str]]:
    """Command-line positionals -> (run/checkpoint folders, section.key=value overrides): an item with "=" whose
    part before it looks like section.key is an override."""
    import re

    overrides = [i for i in items if re.match(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=", i)]
    return [i for i in items if i not in overrides], overrides


def step_of(ckpt: Path) -> int | None:
    from awm_fast.train.checkpoint import STEP_DIR

    match = STEP_DIR.match(Path(ckpt).name)
    return int(match.group(1)) if match else None


def load_sources(paths: list[str], *, base: bool, config: str | None, overrides: list[str],
                 all_checkpoints: bool = False, preset: list[str] = ()) -> list[Source]:
    """Sources for `paths` (one config: the first checkpoint's) or the base model. `preset`: overrides applied
    before the user's (a command's own needs, e.g. a prompt file)."""
    if base == bool(paths):
        raise UsageError("give a run/checkpoint folder or --base (the untrained model), not both" if base else
                         "give a run or checkpoint folder, or --base for the untrained model")
    if base:
        return [Source(load_config(config, [*preset, *overrides]))]
    if config:
        raise UsageError(f"--config {config} with a run/checkpoint: the run's own config is used (its config.yaml); "
                         "give overrides (section.key=value) instead")
    from awm_fast.train import checkpoint as ckpt_io
    from awm_fast.train.resume import build_config, saved_config

    ckpts: list[Path] = []
    for p in paths:
        if all_checkpoints and not (Path(p) / "state.pt").is_file():
            found = ckpt_io.list_checkpoints(Path(p))
            if not found:
                resolve(p)  # raises the one-line reason
            ckpts.extend(found)
        else:
            ckpts.append(resolve(p))
    data, where = saved_config(ckpts[0])
    cfg = build_config(data, where, [*preset, *overrides])
    return [Source(cfg, c, f"{c.parent.parent.name}/{c.name}", step_of(c)) for c in ckpts]


def parse_options(items: list[str], what: str) -> dict:
    """["key=value", ...] (values parsed as YAML) -> dict."""
    from awm_fast.config import parse_override

    out = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            raise UsageError(f"{what}: {exc}") from None
        out[key] = value
    return out


def build_policy(cfg: Config, device: torch.device, prompts: list[str]):
    """(policy, null_cond, digits artifacts or None) with every prompt of `prompts` encodable."""
    from awm_fast.families.load import load_policy

    art = None
    if cfg.model.kind == "digits":
        from awm_fast.families.digits import PROMPTS, load_digits_policy
        from awm_fast.tasks.digits import prepare_digits

        bad = [p for p in prompts if p not in PROMPTS]
        if bad:
            raise UsageError(f"prompt {bad[0]!r}: the digits model knows the prompts {', '.join(PROMPTS)}")
        art = prepare_digits(cfg.digits)
        policy = load_digits_policy(cfg, device, art)
    else:
        policy = load_policy(cfg, device, prompts=list(prompts))
    return policy, policy.encode([""]), art


def load_weights(policy, source: Source) -> dict | None:
    """Copy the checkpoint's trained weights into the policy; returns its training state (None for the base)."""
    if source.is_base:
        return None
    return policy.finetune.load_trained(source.ckpt, policy)  # LoRA: both adapters; full: the trained transformer


WEIGHTS = ("raw", "ema", "both")  # --weights of eval, sample and export (argparse choices: refused at once)


def weight_choices(state: dict | None, wanted: str) -> list[str]:
    """"raw", "ema" or "both" -> the weight sets to use; the base model has raw weights only."""
    if wanted not in WEIGHTS:
        raise UsageError(f"--weights {wanted!r} is not one of {', '.join(WEIGHTS)}")
    has_ema = state is not None and state.get("eval_ema") is not None
    if wanted == "ema" and not has_ema:
        raise UsageError("--weights ema: this source has no evaluation EMA (the base model, train.eval_ema=false "
                         "or train.finetune=full)")
    return ["raw", "ema"] if wanted == "both" and has_ema else ["ema"] if wanted == "ema" else ["raw"]


@contextlib.contextmanager
def weights_in(policy, state: dict | None, weights: str):
    """The raw (trained) weights, or the evaluation EMA swapped into the policy adapter for the block."""
    if weights == "raw":
        yield
        return
    from awm_fast.models.lora import EvalEMA

    ema = EvalEMA(policy.transformer)
    ema.load_state_dict(state["eval_ema"])
    with ema.swapped_in(policy.transformer):
        yield


def device_of(cfg: Config) -> torch.device:
    from awm_fast.env import pick_device

    return pick_device(cfg.run.device)
