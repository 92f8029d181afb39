"""`awm-fast sample RUN|CKPT | --base --prompt TEXT ... | --prompt-file FILE --out DIR`: images from the trained
(or untrained) model, with the rollout samplers of awm_fast/sampling (ODE by default).

Writes --out/NNNN.png per image (prompt-major: --num-per-prompt images of prompt 0, then prompt 1, ...; a video
model writes NNNN.gif and NNNN_frames.png, a few of its frames, per video), grid.png and samples.json (index ->
prompt, file; the seed and sampler settings). Batch k (of --batch-size images) starts from noise seeded by (--seed,
k): the same command gives the same images.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from awm_fast.logs import progress_bar

from awm_fast.commands.common import WEIGHTS, add_source_arguments, UsageError, split_positionals, build_policy, device_of, load_sources, load_weights, \
    weight_choices, weights_in
from awm_fast.train import report
from awm_fast.rewards.base import is_video
from awm_fast.train.previews import frame_strip, write_previews

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="images for given prompts from a checkpoint or the base model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, "sample")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line")
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default sample.eval_num_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default sample.eval_guidance_scale)")
    p.add_argument("--sampler", default="ode", help="ode (default) | euler_maruyama | cps | sa_solver: a choice of "
                                                    "sample.sampler (awm_fast.sampling.rollout.SAMPLERS)")
    p.add_argument("--noise-level", type=float, default=None, help="SDE noise (default sample.noise_level)")
    p.add_argument("--weights", default="raw", choices=WEIGHTS[:2], help="raw | ema (the evaluation EMA); default raw")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output folder")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def run(args) -> int:
    from awm_fast.algorithms.update_loop import derived_seed
    from awm_fast.sampling.rollout import SAMPLERS, sample_latents

    if args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r} is not one of {', '.join(SAMPLERS)}")
    for name in ("num_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} must be >= 1")
    prompts = read_prompts(args)
    preset = ["sample.prompt_file=(command line)"] if args.base else []  # sd3/flux configs require one; unused
    paths, overrides = split_positionals(args.items)
    if len(paths) > 1:
        raise UsageError(f"give one run or checkpoint folder to sample from (got {len(paths)}: {' '.join(paths)})")
    (source,) = load_sources(paths, base=args.base, config=args.config, overrides=overrides, preset=preset)
    cfg = source.cfg
    policy, null_cond, _ = build_policy(cfg, device_of(cfg), prompts)
    state = load_weights(policy, source)
    (weights,) = weight_choices(state, args.weights)
    grid = policy.time_grid(args.steps or cfg.sample.eval_num_steps)
    guidance = cfg.sample.eval_guidance_scale if args.guidance is None else args.guidance
    noise = cfg.sample.noise_level if args.noise_level is None else args.noise_level
    if args.sampler == "ode":
        noise = 0.0
    every = [p for p in prompts for _ in range(args.num_per_prompt)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, records = [], []
    with weights_in(policy, state, weights):
        for k, start in enumerate(progress_bar(range(0, len(every), args.batch_size), desc="sample",
                                               unit="batch")):
            chunk = every[start:start + args.batch_size]
            gen = torch.Generator(device=policy.device).manual_seed(derived_seed(args.seed, "sample", k))
            latents, _ = sample_latents(policy, policy.encode(chunk), grid, sampler=args.sampler, noise_level=noise,
                                        generator=gen, guidance_scale=guidance, null_cond=null_cond,
                                        sa_noise_window=(cfg.sample.sa_noise_t_min, cfg.sample.sa_noise_t_max))
            images.append(policy.decode(latents).float().cpu())
    images = torch.cat(images)
    video = is_video(images)  # (N, F, C, H, W)
    if video:  # NNNN.gif + NNNN_frames.png of every video
        write_previews(images, out, every, max_videos=len(images))
    for i, (prompt, img) in enumerate(zip(every, images)):
        name = f"{i:04d}.gif" if video else f"{i:04d}.png"
        if not video:
            report.save_grid(img[None], out / name, per_row=1, min_cell=1)
        records.append({"index": i, "prompt": prompt, "file": name})
    report.labelled_grid(frame_strip(images[:40]) if video else images[:40], out / "grid.png", prompts=every[:40],
                         cols=min(args.num_per_prompt, 10) if args.num_per_prompt > 1 else None)
    (out / "samples.json").write_text(json.dumps({
        "source": str(source.ckpt or "base"), "weights": weights, "seed": args.seed, "sampler": args.sampler,
        "steps": len(grid) - 1, "guidance_scale": guidance, "noise_level": noise, "batch_size": args.batch_size,
        "images": records}, indent=2))
    logger.info(f"[sample] {len(records)} images in {out} (grid.png)")
    return 0
