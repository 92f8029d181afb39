"""End-of-run artefacts: reward/accuracy curve PNG, before/after sample grid PNG, summary.json; the
after-training commands' image grids, reward-against-step plots and tables (awm_fast/commands)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (the commands' --help stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(mean: list[float], std: list[float], bounded: bool) -> tuple[list[float], list[float]]:
    """mean -+ std, clipped to [0, 1] for a metric that lives there (a probability, an accuracy)."""
    lo, hi = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
    if bounded:
        lo, hi = [max(v, 0.0) for v in lo], [min(v, 1.0) for v in hi]
    return lo, hi


def plot_curves(history: list[dict], evals: list[dict], path: Path) -> None:
    """One panel per metric, each on its own y axis: the rollout reward (mean, band mean +- std clipped to [0, 1]
    when every reward is there), the rollout accuracy (digits), and each evaluation metric (raw and EMA weights)."""
    eval_keys = sorted({k for e in evals for k in e if k not in ("step", "weights")})
    panels = ["reward"] + (["accuracy"] if history and "accuracy" in history[0] else []) + eval_keys
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    steps = [r["step"] for r in history]
    ax = axes.flat[0]
    if history:
        mean, std = [r["reward_mean"] for r in history], [r["reward_std"] for r in history]
        bounded = 0.0 <= min(mean) and max(mean) <= 1.0  # a probability-like reward: keep the band there
        ax.plot(steps, mean, label="mean")
        ax.fill_between(steps, *_band(mean, std, bounded), alpha=0.2, label="mean \u00b1 std")
        ax.legend(fontsize=8)
    ax.set(title="rollout reward", xlabel="step", ylabel="reward")
    if "accuracy" in panels:
        ax = axes.flat[1]
        ax.plot(steps, [r["accuracy"] for r in history])
        ax.set(title="rollout accuracy", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax, key in zip(axes.flat[len(panels) - len(eval_keys):], eval_keys):
        for weights in sorted({e["weights"] for e in evals}):
            pts = [(e["step"], e[key]) for e in evals if e["weights"] == weights and key in e]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{weights} weights")
        ax.set(title=f"evaluation: {key} (ODE, fixed seeds)", xlabel="step", ylabel=key)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _fit(text: str, font, width: int, lines: int = 2) -> list[str]:
    """`text` wrapped to `width` pixels in at most `lines` lines, the last cut with an ellipsis."""
    words, out, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    out.append(line)
    if len(out) > lines:
        out, rest = out[:lines], " ".join(out[lines - 1:])
        while rest and font.getlength(rest + "\u2026") > width:
            rest = rest[:-1]
        out[-1] = rest + "\u2026"
    return [ln if font.getlength(ln) <= width else ln[:max(1, int(len(ln) * width / font.getlength(ln)) - 1)] + "\u2026"
            for ln in out]


def labelled_grid(images: torch.Tensor, path: Path, *, prompts: list[str] | None = None,
                  scores: list[float] | None = None, title: str = "", cols: int | None = None,
                  cell: int = 160) -> None:
    """Images (N, C, H, W) in [0, 1] as one PNG: cells of >= `cell` pixels (nearest upscaling), the prompt (two
    lines at most) and "reward X" under each image, an optional title on top. cols: default min(N, 10)."""
    from PIL import Image, ImageDraw

    if images.ndim != 4 or not len(images):
        raise ValueError(f"labelled_grid: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    n, _, h, w = x.shape
    scale = max(1, -(-cell // max(h, w)))
    cw, ch = w * scale, h * scale
    cols = min(cols or 10, n)
    font, big = _font(13), _font(16)
    text_h = (2 if prompts else 0) * 16 + (16 if scores is not None else 0) + 4
    top = 26 if title else 0
    pad = 8
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, top + rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=big)
    for i in range(n):
        x0, y0 = pad + (i % cols) * (cw + pad), top + pad + (i // cols) * (ch + text_h + pad)
        canvas.paste(Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((cw, ch), Image.NEAREST), (x0, y0))
        y = y0 + ch + 2
        for line in _fit(prompts[i], font, cw) if prompts else []:
            draw.text((x0, y), line, fill="black", font=font)
            y += 16
        if scores is not None:
            draw.text((x0, y), f"reward {scores[i]:.3f}", fill=(20, 90, 170), font=font)
    canvas.save(path)


def plot_grid(before: torch.Tensor, after: torch.Tensor, prompts: list[str], path: Path, *,
              before_scores: list[float] | None = None, after_scores: list[float] | None = None,
              limit: int = 20) -> None:
    """The first `limit` evaluation images before and after training, stacked: two labelled grids in one PNG."""
    from PIL import Image

    n = min(len(before), limit)
    parts = []
    for title, imgs, scores in (("before training", before, before_scores), ("after training", after, after_scores)):
        part = Path(path).with_suffix(f".{title.split()[0]}.png")
        labelled_grid(imgs[:n], part, prompts=prompts[:n], scores=scores[:n] if scores is not None else None,
                      title=title)
        parts.append(Image.open(part).convert("RGB"))
        part.unlink()
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    canvas.paste(parts[0], (0, 0))
    canvas.paste(parts[1], (0, parts[0].height))
    canvas.save(path)


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
    plt = _pyplot()
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
