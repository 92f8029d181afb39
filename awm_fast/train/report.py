"""End-of-run artefacts: reward/accuracy curve PNG, before/after sample grid PNG, summary.json."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_curves(history: list[dict], evals: list[dict], path: Path) -> None:
    """Training reward (mean +- std) per step, and evaluation metrics at their steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    mean = [r["reward_mean"] for r in history]
    std = [r["reward_std"] for r in history]
    axes[0].plot(steps, mean, label="train reward (mean)")
    axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    if history and "accuracy" in history[0]:
        axes[0].plot(steps, [r["accuracy"] for r in history], label="train accuracy")
    axes[0].set_xlabel("step")
    axes[0].set_title("rollouts")
    axes[0].legend()
    for key in sorted({k for e in evals for k in e if k not in ("step", "weights")}):
        for weights in sorted({e["weights"] for e in evals}):
            pts = [(e["step"], e[key]) for e in evals if e["weights"] == weights and key in e]
            axes[1].plot(*zip(*pts), marker="o", label=f"{key} ({weights})")
    axes[1].set_xlabel("step")
    axes[1].set_title("evaluation (ODE, fixed seeds)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(before: torch.Tensor, after: torch.Tensor, prompts: list[str], path: Path, per_row: int = 10) -> None:
    """Two panels of the first `per_row` x 4 evaluation images: before and after training."""
    n = min(len(before), per_row * 4)
    fig, axes = plt.subplots(8, per_row, figsize=(per_row * 0.9, 8 * 0.95))
    for half, (title, imgs) in enumerate((("before", before), ("after", after))):
        for i in range(n):
            ax = axes[half * 4 + i // per_row, i % per_row]
            img = imgs[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}: {prompts[i]}" if i % per_row == 0 else prompts[i], fontsize=6)
        for ax in axes[half * 4:(half + 1) * 4].flat:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
