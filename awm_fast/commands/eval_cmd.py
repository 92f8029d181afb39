"""`awm-fast eval RUN|CKPT [...] | --base`: the trainer's evaluation (deterministic ODE samples from fixed seeds,
train/evaluate.py) of checkpoints or the base model, on a prompt set, with the run's reward or others.

Writes to --out: metrics.json (every source x weights: metric -> mean), per_prompt.csv (one row per prompt and
weights), grid_<label>_<weights>.png (videos: a few frames each, and GIFs of the first ones in
previews_<label>_<weights>/); with several checkpoints also table.md / table.csv and reward_vs_step.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from pathlib import Path

import torch
from awm_fast.logs import progress_bar

from awm_fast.commands.common import (WEIGHTS, add_source_arguments, UsageError, build_policy, device_of, load_sources, load_weights,
                                      split_positionals, weight_choices, weights_in)
from awm_fast.rewards import build_reward, check_reward_output
from awm_fast.rewards.base import score_batch
from awm_fast.train import report

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate runs, checkpoints or the base model: metrics JSON, per-prompt CSV, "
                                    "image grids, a table and a plot over checkpoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, "evaluate", several=True)
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint of each run folder")
    p.add_argument("--prompts", default=None, help="prompt file (.txt, metadata in a .jsonl beside it); default: "
                                                    "the run's evaluation prompts")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (digits: N per digit)")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[@{yaml options}]",
                   help="a reward to score with (repeat for several; default: the run's reward), e.g. "
                        "--reward jpeg_compressibility --reward 'pickscore@{model: /ckpt/PickScore_v1}'")
    p.add_argument("--weights", default="both", choices=WEIGHTS,
                   help="raw | ema | both (default both: raw and the evaluation EMA)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default sample.eval_num_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default sample.eval_guidance_scale)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default train.seed + 1000, as the trainer)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default sample.eval_batch_size, else max(sample.batch_size, 64))")
    p.add_argument("--out", required=True, help="output folder")


class ScoreRecorder:
    """The reward evaluate() calls: every reward of `rewards` on each batch (one name: its outputs as they are;
    several: "<name>/<key>" and "reward" = the first one's), keeping the per-prompt scores in call order. Videos
    go to each reward as it takes them (rewards.base.score_batch)."""

    takes_video = True  # dispatched per reward

    def __init__(self, rewards: dict[str, object], bar) -> None:
        self.named, self.rewards, self.bar = rewards, list(rewards.values()), bar
        self.name = "+".join(rewards)
        self.rows: list[dict[str, float]] = []

    def __call__(self, images, prompts, metadata):
        out: dict[str, torch.Tensor] = {}
        for name, reward in self.named.items():
            got = score_batch(reward, images, prompts, metadata)
            check_reward_output(name, got, len(prompts))
            for key, value in got.items():
                value = torch.as_tensor(value).double().reshape(-1).cpu()
                out[key if len(self.named) == 1 else f"{name}/{key}"] = value
        if len(self.named) > 1:
            out["reward"] = out[f"{next(iter(self.named))}/reward"]
        self.rows.extend({k: float(v[i]) for k, v in out.items()} for i in range(len(prompts)))
        self.bar.update(len(prompts))
        return out


def parse_reward(spec: str) -> tuple[str, dict]:
    import yaml

    name, _, raw = spec.partition("@")
    try:
        options = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--reward {spec!r}: options are not valid YAML ({type(exc).__name__})") from None
    if not isinstance(options, dict):
        raise UsageError(f"--reward {spec!r}: options must be a YAML mapping, e.g. {name}@{{key: value}}")
    return name.strip(), options


def build_rewards(cfg, specs: list[str], digits_classifier) -> dict[str, object]:
    """The rewards to score with, each behind the trainer's one retry layer and time limit (reward.retries,
    reward.retry_wait_s, reward.timeout_s: train/faults.py)."""
    from awm_fast.train.faults import RetryingReward

    if not specs:
        out = {cfg.reward.name: build_reward(cfg.reward.name, digits_classifier=digits_classifier,
                                             weights=cfg.reward.weights, **cfg.reward.options)}
    else:
        out = {}
        for spec in specs:
            name, options = parse_reward(spec)
            try:
                out[name] = build_reward(name, digits_classifier=digits_classifier, **options)
            except (ValueError, TypeError, ImportError) as exc:
                raise UsageError(f"--reward {name}: {exc}") from None
    r = cfg.reward
    return {name: RetryingReward(reward, r.retries, r.retry_wait_s, r.timeout_s) for name, reward in out.items()}


def check_servers(cfg, specs: list[str]) -> None:
    """The reward servers the evaluation needs answer (train/faults.check_reward_servers), in seconds."""
    from awm_fast.train.faults import check_reward_servers

    for name, options in [parse_reward(s) for s in specs] if specs else [(cfg.reward.name, cfg.reward.options)]:
        check_reward_servers(name, options)


def prompt_set(cfg, path: str | None, num: int | None) -> tuple[list[str], list[dict]]:
    if cfg.model.kind == "digits":
        if path:
            raise UsageError("--prompts: the digits model evaluates on the digits 0-9 (use --num-prompts N per digit)")
        from awm_fast.families.digits import PROMPTS

        per = num or cfg.digits.eval_per_digit
        prompts = [p for _ in range(per) for p in PROMPTS]
        return prompts, [{"digit": int(p)} for p in prompts]
    from awm_fast.rewards.prompts import load_prompt_set

    from awm_fast.prompt_sets import resolve_prompt_files

    path = resolve_prompt_files(path or cfg.sample.eval_prompt_file or cfg.sample.prompt_file)[0]
    if not Path(path).is_file():
        raise UsageError(f"prompt file {path!r} does not exist")
    prompts, metadata = load_prompt_set(path)
    n = num or cfg.sample.eval_prompts
    return prompts[:n], metadata[:n]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "base"


def run(args) -> int:
    from awm_fast.train.evaluate import evaluate
    from awm_fast.train.paper_metrics import paper_metrics

    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError(f"--num-prompts {args.num_prompts} must be >= 1")
    paths, overrides = split_positionals(args.items)
    sources = load_sources(paths, base=args.base, config=args.config, overrides=overrides,
                           all_checkpoints=args.all_checkpoints,
                           preset=[f"sample.prompt_file={args.prompts}"] if args.base and args.prompts else [])
    cfg = sources[0].cfg
    check_servers(cfg, args.reward)  # a dead reward server: one line now, before the model loads
    prompts, metadata = prompt_set(cfg, args.prompts, args.num_prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, null_cond, art = build_policy(cfg, device_of(cfg), prompts)
    rewards = build_rewards(cfg, args.reward, art.classifier if art else None)
    kw = dict(num_steps=args.steps or cfg.sample.eval_num_steps,
              seed=cfg.train.seed + 1000 if args.seed is None else args.seed,
              batch_size=args.batch_size or cfg.sample.eval_batch_size or max(cfg.sample.batch_size, 64),
              guidance_scale=cfg.sample.eval_guidance_scale if args.guidance is None else args.guidance,
              null_cond=null_cond)
    results, table, per_prompt = {}, [], []
    for source in sources:
        state = load_weights(policy, source)
        for weights in weight_choices(state, args.weights if not source.is_base else "raw"):
            with progress_bar(total=len(prompts), desc=f"eval {source.label} ({weights})", unit="img") as bar:
                recorder = ScoreRecorder(rewards, bar)
                with weights_in(policy, state, weights):
                    ev = evaluate(policy, recorder, prompts, metadata, **kw,
                                  preview_dir=out / f"previews_{_slug(source.label)}_{weights}")
            metrics = ev.metrics
            results.setdefault(source.label, {"step": source.step, "checkpoint": str(source.ckpt or "")})[weights] = metrics
            table.append({"source": source.label, "step": source.step, "weights": weights, **metrics})
            per_prompt += [{"source": source.label, "weights": weights, "index": i, "prompt": p, **row}
                           for i, (p, row) in enumerate(zip(prompts, recorder.rows))]
            report.labelled_grid(ev.images[:40], out / f"grid_{_slug(source.label)}_{weights}.png",
                                 prompts=prompts[:40], scores=ev.rewards[:40].tolist(),
                                 title=f"{source.label} ({weights} weights)")
            logger.info(f"[eval] {source.label} ({weights}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            for paper in paper_metrics(rewards, recorder.rows, metadata):  # GenEval / OCR / PickScore as the papers
                logger.info(f"[paper] {source.label} ({weights} weights) {paper.line()}")
                results[source.label].setdefault("paper", {}).setdefault(weights, {})[paper.benchmark] = paper.values
    (out / "metrics.json").write_text(json.dumps({"prompts": len(prompts), "num_steps": kw["num_steps"],
                                                  "seed": kw["seed"], "results": results}, indent=2))
    keys = sorted({k for r in per_prompt for k in r if k not in ("source", "weights", "index", "prompt")})
    with open(out / "per_prompt.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["source", "weights", "index", "prompt", *keys])
        writer.writeheader()
        writer.writerows(per_prompt)
    if len(sources) > 1:
        metric_keys = [k for k in table[0] if k not in ("source", "step", "weights")]
        report.write_table(table, ["source", "step", "weights", *metric_keys], out / "table.csv", out / "table.md")
        report.plot_metric_vs_step(table, out / "reward_vs_step.png", ["reward"])
    logger.info(f"[eval] wrote {out}")
    return 0
