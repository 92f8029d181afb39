"""End-of-run artefacts: reward/accuracy curve PNG, before/after sample grid PNG, summary.json; the
after-training commands' image grids, reward-against-step plots and tables (awm_fast/commands)."""
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


def save_grid(images: torch.Tensor, path: Path, per_row: int = 8, min_cell: int = 64) -> None:
    """Images (N, C, H, W) in [0, 1] tiled row-major into one PNG (cells upscaled to >= min_cell pixels, nearest)."""
    from PIL import Image

    if images.ndim != 4 or not len(images):
        raise ValueError(f"save_grid: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    scale = max(1, -(-min_cell // max(h, w)))
    cols = min(per_row, n)
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * w * scale + (cols - 1) * 2, rows * h * scale + (rows - 1) * 2), "white")
    for i in range(n):
        tile = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, ((i % cols) * (w * scale + 2), (i // cols) * (h * scale + 2)))
    canvas.save(path)


def plot_metric_vs_step(rows: list[dict], path: Path, keys: list[str]) -> None:
    """Evaluation metrics of several checkpoints against their step, one line per (metric, weights)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        for weights in sorted({r["weights"] for r in rows}):
            pts = sorted((r["step"], r[key]) for r in rows if r["weights"] == weights and key in r
                         and r["step"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{key} ({weights})")
    ax.set_xlabel("step")
    ax.set_title("evaluation (ODE, fixed seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(rows: list[dict], columns: list[str], csv_path: Path, md_path: Path) -> None:
    """The same rows as CSV and as a Markdown table (floats with 4 decimals in Markdown)."""
    import csv

    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    Path(md_path).write_text("\n".join(lines) + "\n")
