"""The RL loop: rollout -> rewards -> group advantages -> update (AWM, or a baseline: train/algorithms.py)."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from awm_fast.algo.advantages import count_flat_groups, group_advantages
from awm_fast.algo.timesteps import time_grid
from awm_fast.config import Config
from awm_fast.models.lora import POLICY, EvalEMA, adapter_params, update_ema_adapter
from awm_fast.models.load import pick_device
from awm_fast.rewards.async_scorer import AsyncRewardScorer
from awm_fast.train import checkpoint as ckpt
from awm_fast.train import report
from awm_fast.train.algorithms import Algorithm, get_algorithm, merge_extras
from awm_fast.train.evaluate import evaluate
from awm_fast.train.logger import MetricsLogger
from awm_fast.train.task import Task, build_task


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def rollout_and_score(task: Task, cfg: Config, grid: torch.Tensor, gens: dict, algo: Algorithm,
                      scorer: AsyncRewardScorer) -> dict:
    """Sample prompts_per_step prompts x group_size images with `algo.sample`; each decoded batch is scored on
    the reward thread pool while the next batch is sampled."""
    s = cfg.sample
    pick = torch.randint(0, len(task.prompts), (s.prompts_per_step,), generator=gens["prompts"]).tolist()
    order = [k for k in pick for _ in range(s.group_size)]
    prompts = [task.prompts[k] for k in order]
    meta = [task.metadata[k] for k in order]
    groups = torch.arange(s.prompts_per_step).repeat_interleave(s.group_size)
    cond = task.policy.encode(prompts)
    t0 = time.perf_counter()
    latents, extras = [], []
    for b in tqdm(range(0, len(prompts), s.batch_size), desc="sample", unit="batch", leave=False, disable=None):
        x, extra = algo.sample(task.policy, cond[b:b + s.batch_size], grid, cfg, gens["rollout"], task.null_cond)
        scorer.submit(task.policy.decode(x), prompts[b:b + s.batch_size], meta[b:b + s.batch_size])
        latents.append(x)
        extras.append(extra)
    t1 = time.perf_counter()
    outs = scorer.gather()
    timings = scorer.timings[-len(outs):]
    rewards = torch.cat([o["reward"] for o in outs])
    extra = {k: float(torch.cat([o[k] for o in outs]).mean()) for k in outs[0] if k != "reward"}
    return dict(latents=torch.cat(latents), cond=cond, rewards=rewards, groups=groups, extra=extra,
                extras=merge_extras(extras), sample_s=t1 - t0, reward_s=sum(t.score_s for t in timings),
                reward_wait_s=time.perf_counter() - t1)


def step_metrics(roll: dict, stats: dict, decay: float, step_s: float, train_s: float, mem: dict) -> dict:
    """What one step logs: reward stats and reward parts, loss parts, phase times, images/s, memory."""
    r = roll["rewards"]
    return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(), **roll["extra"], **stats,
            "flat_groups": count_flat_groups(r, roll["groups"]), "ema_decay": decay, "time_sample": roll["sample_s"],
            "time_reward": roll["reward_s"], "time_reward_wait": roll["reward_wait_s"], "time_train": train_s,
            "time_step": step_s, "images_per_s": len(r) / step_s, **mem}


def train(cfg: Config, *, resume: str | None = None, log=print) -> Path:
    """Run the loop; returns the path of the run's summary.json."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    ckpt_path = ckpt.resolve_checkpoint(resume) if resume else None
    run_dir = ckpt_path.parent.parent if ckpt_path else \
        Path(cfg.run.output_dir) / (cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    task = build_task(cfg, device, log=log)
    policy, t, s = task.policy, cfg.train, cfg.sample
    algo = get_algorithm(t.algorithm)
    params = list(adapter_params(policy.transformer, POLICY).values())
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    eval_ema = EvalEMA(policy.transformer) if t.eval_ema else None
    gens = {"prompts": torch.Generator().manual_seed(t.seed),
            "rollout": torch.Generator(device=device).manual_seed(t.seed + 1),
            "train": torch.Generator(device=device).manual_seed(t.seed + 2)}
    eval_kw = dict(num_steps=s.eval_num_steps, shift=s.shift, seed=t.seed + 1000, batch_size=max(s.batch_size, 64),
                   guidance_scale=s.eval_guidance_scale, null_cond=task.null_cond)

    def run_eval(step: int, weights: str = "raw"):
        if weights == "ema":
            with eval_ema.swapped_in(policy.transformer):
                metrics, images = evaluate(policy, task.reward, task.eval_prompts, task.eval_metadata, **eval_kw)
        else:
            metrics, images = evaluate(policy, task.reward, task.eval_prompts, task.eval_metadata, **eval_kw)
        evals.append({"step": step, "weights": weights, **metrics})
        log(f"[eval] step {step} ({weights} weights): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics, images

    start, evals, history, train_seconds = 0, [], [], 0.0
    if ckpt_path:
        state = ckpt.load_checkpoint(ckpt_path, policy.transformer)
        optimizer.load_state_dict(state["optimizer"])
        if eval_ema is not None:
            eval_ema.load_state_dict(state["eval_ema"])
        for name, g in gens.items():
            g.set_state(state["generators"][name])
        torch.set_rng_state(state["torch_rng"])
        start, evals, history = state["step"], state["evals"], state["history"]
        before_images, train_seconds = state["before_images"], state["train_seconds"]
        log(f"[resume] {ckpt_path} at step {start}")
    else:
        _, before_images = run_eval(0)
    logger = MetricsLogger(run_dir, cfg.run.tensorboard, history)
    grid = time_grid(s.num_steps, s.shift)
    scorer = AsyncRewardScorer(task.reward, cfg.reward.num_workers)
    with scorer:
        bar = tqdm(range(start, t.steps), desc=t.algorithm, unit="step", initial=start, total=t.steps, mininterval=1.0)
        for step in bar:
            t0 = time.perf_counter()
            reset_peak_memory(device)
            roll = rollout_and_score(task, cfg, grid, gens, algo, scorer)
            advantages = group_advantages(roll["rewards"], roll["groups"], t.adv_clip_max)
            mem = {"peak_mem_rollout_gb": peak_memory_gb(device)}
            t1 = time.perf_counter()
            reset_peak_memory(device)
            stats = algo.update(policy, roll, advantages.to(device), grid, cfg, gens["train"], optimizer, params,
                                task.null_cond)
            mem["peak_mem_train_gb"] = peak_memory_gb(device)
            if stats["skipped"]:
                log(f"[warn] step {step + 1}: non-finite loss or gradient, optimizer step skipped")
            rate, cap = algo.adapter_decay(t)
            decay = update_ema_adapter(policy.transformer, step + 1, rate=rate, cap=cap)
            if eval_ema is not None:
                eval_ema.update(policy.transformer)
            dt = time.perf_counter() - t0
            train_seconds += dt
            metrics = step_metrics(roll, stats, decay, dt, time.perf_counter() - t1, mem if device.type == "cuda" else {})
            logger.log(step + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{stats['loss']:.4f}", refresh=False)
            if metrics["flat_groups"] == s.prompts_per_step:
                log(f"[warn] step {step + 1}: every prompt group has identical rewards: zero advantages, no signal")
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < t.steps:
                run_eval(step + 1)
            if (cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0) or step + 1 == t.steps:
                state = {"optimizer": optimizer.state_dict(), "eval_ema": eval_ema.state_dict() if eval_ema else None,
                         "generators": {k: g.get_state() for k, g in gens.items()}, "torch_rng": torch.get_rng_state(),
                         "evals": evals, "history": logger.history, "before_images": before_images,
                         "train_seconds": train_seconds, "config": cfg.to_dict()}
                ckpt.save_checkpoint(run_dir, step + 1, policy.transformer, state, cfg.run.keep_checkpoints)
        bar.close()
    logger.close()
    after, after_images = run_eval(t.steps)
    summary = {"eval_before": {k: v for k, v in evals[0].items() if k not in ("step", "weights")},
               "eval_after": after, "train_seconds": train_seconds, "steps": t.steps,
               "total_seconds_this_process": time.perf_counter() - t_start, **task.info}
    if eval_ema is not None:
        summary["eval_after_ema"] = run_eval(t.steps, "ema")[0]
    report.plot_curves(logger.history, evals, run_dir / "curves.png")
    report.plot_grid(before_images, after_images, task.eval_prompts, run_dir / "samples_before_after.png")
    (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict(), sort_keys=False))
    report.write_summary(run_dir / "summary.json", summary)
    return run_dir / "summary.json"
