"""Convergence race on the digits task: AWM vs Flow-GRPO vs DiffusionNFT, same trainer, equal image budgets.

For every method: a small learning-rate sweep (seed 0, full length; the best lr by mean evaluation accuracy
over the run, i.e. the area under the accuracy curve), then more seeds at that lr. Each run logs evaluation
accuracy and reward (200 ODE samples, fixed seeds) every `--eval-every` steps against wall-clock training
seconds (evaluation excluded) and images sampled. Time-to-target = the first evaluation with accuracy >=
`--target`. Speedup of AWM over a baseline = baseline's time-to-target / AWM's (seconds and images).

Gradient variance (the paper's central claim): at fixed parameters (base model, fresh adapters) K independent
rollout batches give K gradient estimates g_k of each method (its own sampler and loss, no clipping; Flow-GRPO
with one optimizer step per rollout, so each g_k uses the whole batch as the other methods' do);
    rel_var = (1 / (K - 1)) sum_k ||g_k - g_bar||^2 / (mean_k ||g_k||)^2,
and the mean pairwise cosine between the g_k. Outputs under --out: convergence_<tag>.{md,png,json}.

    python benchmarks/convergence.py            # full: 150 steps, 3 seeds, lr sweep x3, K = 16
    python benchmarks/convergence.py --quick    # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from awm_fast.algorithms import get_algorithm
from awm_fast.algorithms.advantages import group_advantages
from awm_fast.algorithms.base import UpdateContext
from awm_fast.algorithms.update_loop import MicroBatchRNG
from awm_fast.config import load_config
from awm_fast.logs import only_main
from awm_fast.models.lora import POLICY, adapter_params
from awm_fast.rewards.async_scorer import AsyncRewardScorer
from awm_fast.train.task import build_task
from awm_fast.train.trainer import rollout_and_score, train

# Each method's official recipe on the digits preset (10 steps on the SD3 grid with shift 3, 10 prompts x 8 images
# per step): AWM rolls out with SA-Solver (noise 0.4 in [0.3, 0.9]), Flow-GRPO with the SDE (noise 0.7, clip 1e-4,
# beta 0.04, 2 optimizer steps), DiffusionNFT with the old policy's dpm2 solver (its 9 of 10 timesteps).
METHODS = {
    "awm": {"label": "AWM", "lrs": [1e-3, 3e-3, 1e-2], "overrides": [
        "train.algorithm=awm", "sample.sampler=sa_solver", "sample.noise_level=0.4", "train.beta=0.001",
        "train.ema_beta=1.0", "train.num_timesteps=4"]},
    "flow_grpo": {"label": "Flow-GRPO", "lrs": [1e-3, 3e-3, 1e-2], "overrides": [
        "train.algorithm=flow_grpo", "sample.sampler=euler_maruyama", "sample.noise_level=0.7",
        "flow_grpo.beta=0.04", "flow_grpo.clip_range=1e-4", "flow_grpo.sde_window=0", "flow_grpo.optimizer_steps=2"]},
    "nft": {"label": "DiffusionNFT", "lrs": [1e-3, 3e-3, 1e-2], "overrides": [
        "train.algorithm=nft", "nft.beta=1.0", "nft.kl_beta=1e-4", "nft.decay_rate=0.001",
        "nft.decay_cap=0.5"]},
}
def base_overrides(args) -> list[str]:
    return ["run.tensorboard=false", f"run.eval_every={args.eval_every}", "run.checkpoint_every=0",
            f"train.steps={args.steps}", f"digits.eval_per_digit={args.eval_per_digit}", "train.eval_ema=false",
            f"run.threads={args.threads}"]


def run_one(method: str, lr: float, seed: int, args, workdir: Path) -> dict:
    """One training run; returns its evaluation curve and per-step training curve."""
    name = f"{method}_lr{lr:g}_s{seed}"
    cfg = load_config(None, base_overrides(args) + METHODS[method]["overrides"] + [
        f"train.lr={lr}", f"train.seed={seed}", f"run.output_dir={workdir}", f"run.name={name}"])
    torch.manual_seed(seed)  # the LoRA init draws from the global generator
    t0 = time.perf_counter()
    with only_main(False):  # the run's info lines stay quiet (warnings still print); its curves are read below
        train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    seconds = [0.0]
    for r in rows:
        seconds.append(seconds[-1] + r["time_step"])
    per_step = cfg.sample.prompts_per_step * cfg.sample.group_size
    evals = [{"step": e["step"], "images": e["step"] * per_step, "seconds": seconds[e["step"]], **e["metrics"]}
             for e in map(json.loads, (workdir / name / "evals.jsonl").read_text().splitlines())
             if e["weights"] == "raw"]
    evals = sorted({e["step"]: e for e in evals}.values(), key=lambda e: e["step"])
    reached = next((e for e in evals if e["accuracy"] >= args.target), None)
    return {"method": method, "lr": lr, "seed": seed, "evals": evals, "wall_s": wall, "images_per_step": per_step,
            "train_reward": [r["reward_mean"] for r in rows], "step_seconds": statistics.mean(r["time_step"] for r in rows),
            "auc_accuracy": statistics.mean(e["accuracy"] for e in evals), "final_accuracy": evals[-1]["accuracy"],
            "final_reward": evals[-1]["reward"],
            "ttt_seconds": reached["seconds"] if reached else None, "ttt_images": reached["images"] if reached else None}


class _CaptureGrad:
    """Stands in for the optimizer: step() records the flattened gradient instead of moving the weights."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                                     for p in self.params]))


def gradient_variance(method: str, batches: int, args, workdir: Path) -> dict:
    """K gradient estimates at the base model with fresh adapters, one per independent rollout batch."""
    one_step = ["flow_grpo.optimizer_steps=1"] if method == "flow_grpo" else []
    cfg = load_config(None, base_overrides(args) + METHODS[method]["overrides"] + one_step + [
        f"train.lr={METHODS[method]['lrs'][0]}", f"run.output_dir={workdir}", "train.max_grad_norm=1e30"])
    torch.manual_seed(0)
    task = build_task(cfg, torch.device("cpu"))
    algo = get_algorithm(cfg)
    params = list(adapter_params(task.policy.transformer, POLICY).values())
    capture = _CaptureGrad(params)
    grid = task.policy.time_grid(cfg.sample.num_steps)
    with AsyncRewardScorer(task.reward) as scorer:
        for k in range(batches):
            # the trainer's seeding: batch k is step k of a run seeded 10_000 (prompts, rollout noise, training rows)
            roll = rollout_and_score(task, cfg, grid, 10_000, algo, scorer, step=k)
            adv = group_advantages(roll.rewards, roll.groups, cfg.train.adv_clip_max)
            algo.update(UpdateContext(task.policy, grid, MicroBatchRNG(10_000, k), capture, params, task.null_cond),
                        roll, adv)
    g = torch.stack(capture.grads)
    assert g.shape[0] == batches, "one gradient estimate per rollout batch"
    norms = g.norm(dim=1)
    mean_g = g.mean(0)
    rel_var = float(((g - mean_g) ** 2).sum(1).sum() / (batches - 1) / norms.mean() ** 2)
    unit = g / norms[:, None].clamp(min=1e-30)
    cos = unit @ unit.T
    pairs = batches * (batches - 1)
    return {"batches": batches, "rel_var": rel_var, "mean_cosine": float((cos.sum() - cos.diagonal().sum()) / pairs),
            "mean_grad_norm": float(norms.mean()), "mean_of_grads_norm": float(mean_g.norm())}


def _spread(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], method: str, lr: float, budget: dict) -> dict:
    mine = [r for r in runs if r["method"] == method and r["lr"] == lr]
    out = {"lr": lr, "seeds": [r["seed"] for r in mine], "reached": sum(r["ttt_seconds"] is not None for r in mine),
           "final_accuracy": _spread([r["final_accuracy"] for r in mine]),
           "final_reward": _spread([r["final_reward"] for r in mine]),
           "step_seconds": _spread([r["step_seconds"] for r in mine])}
    for unit in ("seconds", "images"):
        # A seed that never reaches the target counts at the full budget: the mean is then a lower bound.
        vals = [r[f"ttt_{unit}"] if r[f"ttt_{unit}"] is not None else budget[unit] for r in mine]
        out[f"ttt_{unit}"] = {**_spread(vals), "lower_bound": out["reached"] < len(mine)}
    return out


def speedups(summary: dict) -> dict:
    """baseline time-to-target / AWM time-to-target, in seconds and images (None when AWM missed it in a seed,
    or reached it at step 0)."""
    out = {}
    awm = summary["awm"]
    for m in summary:
        if m == "awm":
            continue
        out[m] = {}
        for unit in ("seconds", "images"):
            a, b = awm[f"ttt_{unit}"], summary[m][f"ttt_{unit}"]
            ok = awm["reached"] == len(awm["seeds"]) and a["mean"]
            out[m][unit] = {"ratio": b["mean"] / a["mean"] if ok else None, "lower_bound": b["lower_bound"]}
    return out


def plot(runs: list[dict], summary: dict, variance: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5 if variance else 4, figsize=(24 if variance else 19, 4))
    for m, s in summary.items():
        mine = [r for r in runs if r["method"] == m and r["lr"] == s["lr"]]
        for col, (key, unit) in enumerate([(k, u) for k in ("accuracy", "reward") for u in ("seconds", "images")]):
            ax = axes[col]
            for i, r in enumerate(mine):
                ax.plot([e[unit] for e in r["evals"]], [e[key] for e in r["evals"]], color=f"C{list(summary).index(m)}",
                        alpha=0.8, label=f"{METHODS[m]['label']} lr {s['lr']:g}" if i == 0 else None)
            ax.set_xlabel("training seconds (eval excluded)" if unit == "seconds" else "images sampled")
            ax.set_ylabel(f"eval {key}")
            if key == "accuracy":
                ax.axhline(target, color="gray", ls=":")
            ax.legend(fontsize=7)
    if variance:
        names = list(variance)
        axes[4].bar([METHODS[m]["label"] for m in names], [variance[m]["rel_var"] for m in names],
                    color=[f"C{list(summary).index(m)}" for m in names])
        axes[4].set_ylim(0, 1.15 * max(variance[m]["rel_var"] for m in names))
        axes[4].set_title("gradient rel. variance at init (lower = steadier)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(s: dict, unit: str) -> str:
    if s["mean"] is None:
        return "-"
    f = (lambda x: f"{x:.0f}") if unit == "images" else (lambda x: f"{x:.1f}")
    return f"{'>=' if s.get('lower_bound') else ''}{f(s['mean'])} ± {f(s['std'])} [{f(s['min'])}, {f(s['max'])}]"


def _ratio(x: dict) -> str:
    return "n/a (AWM missed the target or reached it before training)" if x["ratio"] is None else f"{'>=' if x['lower_bound'] else ''}{x['ratio']:.2f}x"


def write_markdown(result: dict, path: Path) -> None:
    a, s, v, sp = result["args"], result["summary"], result["variance"], result["speedups"]
    lines = [f"# Convergence on the digits task ({result['mode']}, {a['tag']})", "",
             f"{a['steps']} steps x {result['images_per_step']} images per method and seed ({a['steps'] * result['images_per_step']} "
             f"images), seeds {a['seeds']}, lr sweep {'on seed 0' if result['sweep'] else 'off'}; evaluation every "
             f"{a['eval_every']} steps on {10 * a['eval_per_digit']} ODE samples; target accuracy {a['target']:.0%}. "
             f"Machine: {result['machine']}. Total benchmark time {result['total_seconds']:.0f} s. "
             "Seconds are summed training-step times (rollout + reward + update; evaluation excluded); the CPU may "
             "have been shared with other jobs, so images are the steadier axis.", "",
             f"Command: `{result['command']}`" + (f" (with --note). {a['note']}" if a.get("note") else ""), "",
             "| method | lr | reached | time-to-target s (mean ± std [min, max]) | images to target | final accuracy | "
             "final reward | s/step |", "|---|---|---|---|---|---|---|---|"]
    for m, x in s.items():
        lines.append(f"| {METHODS[m]['label']} | {x['lr']:g} | {x['reached']}/{len(x['seeds'])} | {_fmt(x['ttt_seconds'], 's')} | "
                     f"{_fmt(x['ttt_images'], 'images')} | {x['final_accuracy']['mean']:.3f} ± {x['final_accuracy']['std']:.3f} | "
                     f"{x['final_reward']['mean']:.3f} ± {x['final_reward']['std']:.3f} | {x['step_seconds']['mean']:.2f} |")
    lines += ["", "Speedup of AWM (baseline time-to-target / AWM time-to-target; '>=' where the baseline missed the "
              "target in some seed and was counted at the full budget):", ""]
    for m, x in sp.items():
        lines.append(f"- vs {METHODS[m]['label']}: seconds {_ratio(x['seconds'])}, images {_ratio(x['images'])}")
    if result["sweep"]:
        seed0 = [r for r in result["runs"] if r["seed"] == 0]
        lrs = sorted({r["lr"] for r in seed0})  # the rates actually run (--lrs), not the defaults
        lines += ["", "Learning-rate sweep (seed 0): mean eval accuracy over the run / final accuracy", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for m in s:
            found = {r["lr"]: r for r in seed0 if r["method"] == m}
            cells = [f"{found[lr]['auc_accuracy']:.3f} / {found[lr]['final_accuracy']:.3f}" if lr in found else "-"
                     for lr in lrs]
            lines.append(f"| {METHODS[m]['label']} | " + " | ".join(cells) + " |")
    if v:
        lines += ["", f"Gradient variance at the base model with fresh adapters ({next(iter(v.values()))['batches']} independent "
                  "rollout batches): rel_var = sum_k ||g_k - g_bar||^2 / (K - 1) / (mean ||g_k||)^2; higher = noisier.", "",
                  "| method | rel_var | mean pairwise cosine | ratio to AWM |", "|---|---|---|---|"]
        for m, x in v.items():
            lines.append(f"| {METHODS[m]['label']} | {x['rel_var']:.3f} | {x['mean_cosine']:.3f} | "
                         f"{x['rel_var'] / v['awm']['rel_var']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def command_line(argv: list[str]) -> str:
    """The command as run, without --note (the markdown prints the note itself)."""
    shown = [a for i, a in enumerate(argv) if a != "--note" and not a.startswith("--note=")
             and (i == 0 or argv[i - 1] != "--note")]
    return shlex.join(["python", "benchmarks/convergence.py", *shown])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30 steps, 2 seeds, no lr sweep, K = 4")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-per-digit", type=int)
    p.add_argument("--variance-batches", type=int)
    p.add_argument("--lrs", default="", help="comma-separated sweep values for every method (default: per method)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on a shared CPU)")
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--methods", default="awm,flow_grpo,nft")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--note", default="", help="a sentence for the markdown (e.g. what else ran on the machine)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (30 if q else 150)
    args.seeds = args.seeds or (2 if q else 3)
    args.eval_every = args.eval_every or (10 if q else 10)
    args.eval_per_digit = args.eval_per_digit or (10 if q else 20)
    args.variance_batches = args.variance_batches or (4 if q else 16)
    sweep = not (q or args.no_sweep)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown {m!r} (known: {', '.join(METHODS)})")
    if "awm" not in methods or args.steps < 1 or args.seeds < 1 or args.variance_batches < 2:
        p.error("--methods must include awm; --steps, --seeds >= 1; --variance-batches >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / f"_runs_{args.tag}"
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    runs, summary = [], {}
    torch.set_num_threads(args.threads)
    if args.lrs:
        for m in METHODS:
            METHODS[m]["lrs"] = [float(x) for x in args.lrs.split(",")]
    for m in methods:
        lrs = METHODS[m]["lrs"] if sweep else [METHODS[m]["lrs"][len(METHODS[m]["lrs"]) // 2]]
        for lr in lrs:
            runs.append(run_one(m, lr, 0, args, workdir))
            print(f"[run] {m} lr {lr:g} seed 0: final acc {runs[-1]['final_accuracy']:.3f}, "
                  f"ttt {runs[-1]['ttt_seconds']}", flush=True)
        best = max((r for r in runs if r["method"] == m), key=lambda r: (r["auc_accuracy"], r["final_accuracy"]))["lr"]
        for seed in range(1, args.seeds):
            runs.append(run_one(m, best, seed, args, workdir))
            print(f"[run] {m} lr {best:g} seed {seed}: final acc {runs[-1]['final_accuracy']:.3f}, "
                  f"ttt {runs[-1]['ttt_seconds']}", flush=True)
        final = [r for r in runs if r["method"] == m and r["lr"] == best]
        budget = {"seconds": max(r["evals"][-1]["seconds"] for r in final),
                  "images": args.steps * final[0]["images_per_step"]}
        summary[m] = summarise(runs, m, best, budget)
    variance = {m: gradient_variance(m, args.variance_batches, args, workdir) for m in methods}
    for m, x in variance.items():
        print(f"[variance] {m}: rel_var {x['rel_var']:.4f}, cosine {x['mean_cosine']:.4f}", flush=True)
    import platform

    result = {"mode": "quick" if q else "full", "args": vars(args), "sweep": sweep,
              "command": command_line(sys.argv[1:] if argv is None else argv),
              "images_per_step": runs[0]["images_per_step"],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}, load average {load0[0]:.1f} at the start and "
                         f"{os.getloadavg()[0]:.1f} at the end",
              "runs": runs, "summary": summary, "speedups": speedups(summary), "variance": variance,
              "variance_ratio_to_awm": {m: variance[m]["rel_var"] / variance["awm"]["rel_var"] for m in variance},
              "total_seconds": time.perf_counter() - t0}
    stem = out / f"convergence_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(result, stem.with_suffix(".md"))
    plot(runs, summary, variance, args.target, stem.with_suffix(".png"))
    parts = []
    for m, x in result["speedups"].items():
        txt = "/".join(_ratio(x[u]) for u in ("seconds", "images"))
        parts.append(f"{METHODS[m]['label']} {txt} (grad rel_var ratio {result['variance_ratio_to_awm'][m]:.2f})")
    print(f"AWM speedup to {args.target:.0%} accuracy (baseline time / AWM time, seconds/images): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
