"""The RL loop: rollout -> rewards -> group advantages -> update -> EMA (AWM, or a baseline: awm_fast/algorithms/).

One process, or N under torchrun (train/distributed.py). Each step's prompt groups come from a sampler seeded
by (seed, step) that every rank draws identically: prompts_per_step prompts x group_size copies, shuffled over
the step's global batch; rank r rolls out its contiguous share. Rollout batch k (global index) starts from
noise seeded by (seed, step, k) and training micro-batch i by (seed, step, i), so a sample's randomness never
depends on the rank that produces it, and a 2-process run computes what a 1-process run computes with the
same global batch. Rewards are gathered, so the advantage statistics (group mean, global std) are the
1-process ones; DDP (LoRA) or FSDP2 (full fine-tuning, models/full_finetune.py) averages the gradients;
evaluation is sharded and gathered; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path

import torch

from awm_fast.algorithms import get_algorithm
from awm_fast.algorithms.advantages import count_flat_groups, group_advantages
from awm_fast.algorithms.base import Algorithm, Rollout, UpdateContext
from awm_fast.algorithms.update_loop import MicroBatchRNG, UpdateResult, derived_seed
from awm_fast.config import Config
from awm_fast.logs import only_main, progress_bar
from awm_fast.models.lora import EvalEMA
from awm_fast.rewards.async_scorer import AsyncRewardScorer, decode_on_side_stream
from awm_fast.train import checkpoint as ckpt
from awm_fast.train import progress, report
from awm_fast.train.distributed import Dist, current, init_distributed, shutdown, wrap_for_training
from awm_fast.train.evaluate import Evaluation, evaluate
from awm_fast.train.faults import NonFiniteGuard, RetryingReward, check_reward_servers, out_of_memory, run_event
from awm_fast.train.launch import split_problem
from awm_fast.train.logger import MetricsLogger
from awm_fast.train.resume import dump_config
from awm_fast.train.run_folder import lineage, open_run_folder
from awm_fast.train.stop import StopRequest, Stopped, stop_on_signals
from awm_fast.train.task import Task, build_task
from awm_fast.train.wandb_logger import check_wandb, open_wandb

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def out_of_memory_stops(phase: str, device: torch.device):
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(phase, exc, device) from None


def plan_step(num_prompts: int, prompts_per_step: int, group_size: int, seed: int, step: int):
    """The step's global batch, identical on every rank: (prompt index, group id) of each of the
    prompts_per_step x group_size images, the groups shuffled over the batch. Prompts are drawn without
    replacement (as the official sampler: a random permutation's first prompts_per_step); with more groups than
    prompts, further permutations follow, so no prompt repeats before every prompt has been drawn."""
    g = torch.Generator().manual_seed(derived_seed(seed, step, "prompts"))
    rounds = -(-prompts_per_step // num_prompts)
    pick = torch.cat([torch.randperm(num_prompts, generator=g) for _ in range(rounds)])[:prompts_per_step]
    perm = torch.randperm(prompts_per_step * group_size, generator=g)
    return pick.repeat_interleave(group_size)[perm], torch.arange(prompts_per_step).repeat_interleave(group_size)[perm]


def rollout_and_score(task: Task, cfg: Config, grid: torch.Tensor, seed: int, algo: Algorithm,
                      scorer: AsyncRewardScorer, *, step: int = 0, dist: Dist | None = None) -> Rollout:
    """This rank's share of the step's images, sampled with `algo.sample` in batches of sample.batch_size
    (each decoded batch is scored on the reward threads while the next one samples; on CUDA the decode runs on a
    side stream beside the next batch's denoising); rewards, reward parts and group ids are gathered over all
    ranks (global order), latents/cond/trajectory stay local. `seed`: the run's seed (train.seed)."""
    dist = dist or current()
    s = cfg.sample
    prompt_of, groups = plan_step(len(task.prompts), s.prompts_per_step, s.group_size, seed, step)
    n_local = len(prompt_of) // dist.world
    lo = dist.rank * n_local
    prompts = [task.prompts[k] for k in prompt_of[lo:lo + n_local].tolist()]
    meta = [task.metadata[k] for k in prompt_of[lo:lo + n_local].tolist()]
    cond = task.policy.encode(prompts)
    t0 = time.perf_counter()
    batches = []
    for b in progress_bar(range(0, n_local, s.batch_size), desc="sample", unit="batch", leave=False):
        gen = torch.Generator(device=task.policy.device).manual_seed(
            derived_seed(seed, step, "rollout", (lo + b) // s.batch_size))
        batches.append(algo.sample(task.policy, cond[b:b + s.batch_size], grid, gen, task.null_cond))
        images, ready = decode_on_side_stream(task.policy.decode, batches[-1].latents, scorer.pool is not None)
        scorer.submit(images, prompts[b:b + s.batch_size], meta[b:b + s.batch_size], ready=ready)
    t1 = time.perf_counter()
    outs = scorer.gather()
    timings = scorer.timings[-len(outs):]
    keys = ["reward"] + sorted(k for k in outs[0] if k != "reward")
    table = torch.stack([torch.cat([o[k] for o in outs]) for k in keys], dim=1)  # (n_local, keys) float64
    table = dist.all_gather_cat(table, "gathering the rollout rewards")
    latents, kept = Rollout.merge(batches)
    return Rollout(latents, cond, table[:, 0], groups, slice(lo, lo + n_local),
                   reward_parts={k: float(table[:, i].mean()) for i, k in enumerate(keys) if i},
                   kept=kept, sample_s=t1 - t0, reward_s=sum(t.score_s for t in timings),
                   reward_wait_s=time.perf_counter() - t1)


class StepClock:
    """Seconds and (CUDA) peak memory of each phase of one step; the step's seconds from creation to `stop`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.end, self.times, self.memory = device, time.perf_counter(), None, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
        if self.device.type == "cuda":
            self.memory[f"peak_mem_{name}_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30

    def stop(self) -> float:
        self.end = time.perf_counter()
        return self.seconds()

    def seconds(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start


def step_metrics(roll: Rollout, result: UpdateResult, decay: float, clock: StepClock) -> dict:
    """What one step logs: reward stats and reward parts, loss parts, phase times, images/s, memory (CUDA)."""
    r, step_s = roll.rewards, clock.seconds()
    return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(), **roll.reward_parts,
            **result.metrics(), "flat_groups": count_flat_groups(r, roll.groups), "ema_decay": decay,
            "time_sample": roll.sample_s, "time_reward": roll.reward_s, "time_reward_wait": roll.reward_wait_s,
            "time_train": clock.times["train"], "time_step": step_s, "images_per_s": len(r) / step_s, **clock.memory}


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def train(cfg: Config, *, resume: str | None = None) -> Path:
    """Run the loop (on every rank of a torchrun launch); returns the path of the run's summary.json. Its lines
    go to the "awm_fast" logger (awm_fast/logs.py), info lines from rank 0 only. run.threads applies to the
    run only: the process's torch thread count is put back afterwards."""
    d = init_distributed(cfg.run.device, cfg.run.dist_backend, cfg.run.dist_timeout_s)
    threads = torch.get_num_threads()
    try:
        with only_main(d.is_main):
            if cfg.run.threads:
                torch.set_num_threads(cfg.run.threads)
            # the run folder's lock (train/run_folder.py); SIGTERM / SIGINT stop at a step boundary (train/stop.py)
            with contextlib.ExitStack() as held, stop_on_signals() as stop:
                path = _train(cfg, d, resume, held, stop)
    except Stopped as exc:
        if d.enabled:  # every rank stopped after the same step
            traceback.clear_frames(exc.__traceback__)  # the run's frames (its DDP wrapper) go before the group
            shutdown()
        raise
    finally:
        torch.set_num_threads(threads)
    if d.enabled:
        d.barrier("waiting for rank 0 to write the summary")
        shutdown()
    return path


def restore_state(ckpt_path: Path, policy, optimizer, eval_ema, d: Dist) -> dict:
    """Load a checkpoint into the weights, optimizer and evaluation EMA (and this rank's RNG when the world size
    is the one it was saved with); returns the saved training state (step, evals, history, ...)."""
    state = policy.finetune.load_checkpoint(ckpt_path, policy, optimizer)  # LoRA adapters or whole weights
    if eval_ema is not None:
        eval_ema.load_state_dict(state["eval_ema"])
    rngs = state.get("rng", [])
    if len(rngs) == d.world:
        torch.set_rng_state(rngs[d.rank]["torch"])
        if d.device.type == "cuda" and rngs[d.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[d.rank]["cuda"], d.device)
    saved_world = state.get("sampler", {}).get("world_size", len(rngs))
    logger.info(f"[resume] {ckpt_path} at step {state['step']}"
                + (f" (saved on {saved_world} processes, now {d.world}: per-rank RNG states not restored, none is used)"
                   if saved_world != d.world else ""))
    return state


def save_state(run_dir: Path, step: int, cfg: Config, policy, optimizer, eval_ema, d: Dist, progress: dict) -> None:
    """Every rank joins gathering RNG states (and full weights / optimizer under FSDP2); rank 0 writes the
    checkpoint atomically (train/checkpoint.py)."""
    rngs = d.all_gather_object(rng_state(d.device), "gathering RNG states for the checkpoint")
    with d.guard("gathering the full weights for the checkpoint"):
        weights, optim = policy.finetune.checkpoint_state(policy, optimizer)  # weights: None for LoRA
    if d.is_main:
        state = {"optimizer": optim, "eval_ema": eval_ema.state_dict() if eval_ema else None, "rng": rngs,
                 "sampler": {"seed": cfg.train.seed, "step": step, "world_size": d.world}, **progress,
                 "config": cfg.to_dict()}
        ckpt.save_checkpoint(run_dir, step, policy.transformer, state, cfg.run.keep_checkpoints, weights)


def _train(cfg: Config, d: Dist, resume: str | None, held: contextlib.ExitStack, stop: StopRequest) -> Path:
    t, s = cfg.train, cfg.sample
    images_per_step = s.prompts_per_step * s.group_size
    problem = split_problem(cfg, d.world)  # P G mod (N b) = 0 (train/launch.py); before anything loads
    if problem:
        raise ValueError(problem)
    torch.manual_seed(t.seed)  # the LoRA initialisation: the same in every run and on every rank
    device = d.device
    from awm_fast.prompt_sets import resolve_prompt_files

    resolve_prompt_files(cfg.sample.prompt_file, cfg.sample.eval_prompt_file)  # a missing official set: one line
    check_reward_servers(cfg.reward.name, cfg.reward.options)  # a dead reward server: one line in seconds, no folder
    if cfg.run.wandb:  # every rank, so that none waits in a collective for one that stopped
        check_wandb(cfg)  # the package and, online, a login: one line now instead of a traceback after step 0
    # created and locked; a resume goes on in place or in a new branch folder that records its parent
    run_dir, ckpt_path, cfg = open_run_folder(cfg, resume, d, held)
    stop.run_dir = run_dir
    if d.is_main:
        dump_config(cfg, run_dir / "config.yaml")  # at the start: a killed run can be resumed as it was
    t_start = time.perf_counter()
    with d.main_first():  # rank 0 builds the caches (digits model, prompt embeddings), the others read them
        task = build_task(cfg, device)
    task.reward = RetryingReward(task.reward, cfg.reward.retries, cfg.reward.retry_wait_s, cfg.reward.timeout_s)
    policy = task.policy
    train_policy = wrap_for_training(policy, d)  # DDP (LoRA) or FSDP2 (full) on several processes
    algo = get_algorithm(cfg)
    params = policy.finetune.trained_params(policy)  # the "default" adapter, or every trained weight
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    eval_ema = EvalEMA(policy.transformer) if t.eval_ema else None
    eval_kw = dict(num_steps=s.eval_num_steps, seed=t.seed + 1000, batch_size=s.eval_batch_size or max(s.batch_size, 64),
                   guidance_scale=s.eval_guidance_scale, null_cond=task.null_cond, dist=d)

    def run_eval(step: int, weights: str = "raw") -> Evaluation:
        with out_of_memory_stops("evaluation", device), \
                (eval_ema.swapped_in(policy.transformer) if weights == "ema" else contextlib.nullcontext()):
            ev = evaluate(policy, task.reward, task.eval_prompts, task.eval_metadata, **eval_kw,
                          preview_dir=run_dir / "previews" / f"step_{step:06d}_{weights}")  # videos
        evals.append({"step": step, "weights": weights, **ev.metrics})
        logger.info(f"[eval] step {step} ({weights} weights): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items()))
        if metrics_logger is not None:  # the samples of every evaluation: reward hacking shows mid-run
            metrics_logger.log_eval_grid(ev, task.eval_prompts, step, weights)
        return ev

    start, evals, history, train_seconds = 0, [], [], 0.0
    if ckpt_path:
        state = restore_state(ckpt_path, policy, optimizer, eval_ema, d)
        start, evals, history = state["step"], state["evals"], state["history"]
        before_images, train_seconds = state["before_images"], state["train_seconds"]
        before_rewards = state.get("before_rewards")
    metrics_logger = MetricsLogger(run_dir, cfg.run.tensorboard, history, evals=evals,
                                   wandb=open_wandb(cfg, run_dir) if cfg.run.wandb else None) if d.is_main else None
    if not ckpt_path:
        first = run_eval(0)
        before_images, before_rewards = first.images, first.rewards
    grid = policy.time_grid(s.num_steps)
    nonfinite = NonFiniteGuard(t.max_nonfinite_steps)

    def after_step(done: int, roll: Rollout, result: UpdateResult, decay: float, clock: StepClock) -> float:
        """The bookkeeping of step `done` (1-based): metrics averaged over ranks and logged, the non-finite
        guard, warnings, periodic evaluation and checkpoint (also when stopping). Returns the step's seconds
        (up to the bookkeeping)."""
        step_s = clock.stop()
        run_event("update", done)
        result.losses = d.mean(result.losses)  # grad_norm and skipped are already global
        metrics = step_metrics(roll, result, decay, clock)
        if metrics_logger is not None:
            metrics_logger.log(done, metrics)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{result.losses['loss']:.4f}", refresh=False)
        lines.update(done, metrics, step_s)
        nonfinite.update(done, result.skipped > 0)
        if metrics["flat_groups"] == s.prompts_per_step:
            logger.warning(f"[warn] step {done}: every prompt group has identical rewards: zero advantages, "
                           "no signal")
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < t.steps:
            run_eval(done)
            if eval_ema is not None:  # raw and EMA weights at every evaluation, as the official eval()
                run_eval(done, "ema")
        stopping = stop.agreed(d)  # a SIGTERM / SIGINT on any rank, until now: every rank stops after this step
        if stopping or (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or done == t.steps:
            save_state(run_dir, done, cfg, policy, optimizer, eval_ema, d, {
                "evals": evals, "history": metrics_logger.history if metrics_logger else None,
                "before_images": before_images, "before_rewards": before_rewards,
                "train_seconds": train_seconds + step_s})
        return step_s

    micro_per_rank = images_per_step // d.world // t.micro_batch
    scorer = AsyncRewardScorer(task.reward, cfg.reward.num_workers)
    with scorer:
        bar = progress_bar(range(start, t.steps), main=d.is_main, desc=t.algorithm, unit="step", initial=start,
                           total=t.steps, mininterval=1.0)
        lines = progress.StepLines(t.steps, start, every_s=cfg.run.log_every_s,
                                   enabled=d.is_main and bar.disable)  # a log line where no bar shows
        for step in bar:
            clock = StepClock(device)
            with clock.phase("rollout"), out_of_memory_stops("the rollout", device):
                roll = rollout_and_score(task, cfg, grid, t.seed, algo, scorer, step=step, dist=d)  # + rewards
            advantages = group_advantages(roll.rewards, roll.groups, t.adv_clip_max)[roll.local].to(device)
            ctx = UpdateContext(train_policy, grid, MicroBatchRNG(t.seed, step, d.rank * micro_per_rank, device),
                                optimizer, params, task.null_cond, agree=d.any)
            with clock.phase("train"), out_of_memory_stops("the update", device), \
                    d.guard("the update (DDP gradient all-reduce)", any_error=False):
                result = algo.update(ctx, roll, advantages)
            rate, cap = algo.adapter_decay()
            decay = policy.finetune.update_ema(policy, algo.decay_step(step + 1), rate=rate, cap=cap)
            if eval_ema is not None:
                eval_ema.update(policy.transformer)
            train_seconds += after_step(step + 1, roll, result, decay, clock)
            if stop.stopping:  # checkpointed by after_step (train/stop.py)
                if metrics_logger is not None:
                    metrics_logger.flush_evals()
                    metrics_logger.close()
                raise stop.stopped(run_dir, step + 1)
        bar.close()
    final = run_eval(t.steps)
    after = final.metrics
    after_ema = run_eval(t.steps, "ema").metrics if eval_ema is not None else None
    if not d.is_main:
        return run_dir / "summary.json"
    summary = {"eval_before": {k: v for k, v in evals[0].items() if k not in ("step", "weights")},
               "eval_after": after, "train_seconds": train_seconds, "steps": t.steps, "world_size": d.world,
               "total_seconds_this_process": time.perf_counter() - t_start, **task.info, **lineage(run_dir)}
    if after_ema is not None:
        summary["eval_after_ema"] = after_ema
    report.plot_curves(metrics_logger.history, evals, run_dir / "curves.png")
    report.plot_grid(before_images, final.images, task.eval_prompts, run_dir / "samples_before_after.png",
                     before_scores=before_rewards, after_scores=final.rewards)
    dump_config(cfg, run_dir / "config.yaml")
    metrics_logger.flush_evals()
    metrics_logger.log_images({"curves": run_dir / "curves.png",
                               "samples_before_after": run_dir / "samples_before_after.png"}, t.steps)
    metrics_logger.close()
    report.write_summary(run_dir / "summary.json", summary)
    return run_dir / "summary.json"
