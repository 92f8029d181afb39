"""The pictures a run leaves: one labelled panel per metric, grids with the prompt and reward under each image."""
import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from awm_fast.train import report


def _history(n=12):
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(n, generator=g) * 0.3 + torch.linspace(0.05, 0.6, n)
    return [{"step": i + 1, "reward_mean": float(m), "reward_std": 0.4, "accuracy": float(m)} for i, m in
            enumerate(mean)]


def test_curves_have_one_labelled_panel_per_metric_and_a_band_inside_zero_one(tmp_path, monkeypatch):
    captured = {}
    from matplotlib.figure import Figure

    real = Figure.savefig

    def keep(fig, *a, **k):
        captured["axes"] = [ax for ax in fig.axes if ax.axison]
        return real(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    evals = [{"step": s, "weights": w, "reward": 0.2 + s / 40, "accuracy": 0.3 + s / 30}
             for s in (0, 6, 12) for w in ("raw", "ema") if w == "raw" or s == 12]
    report.plot_curves(_history(), evals, tmp_path / "curves.png")
    axes = captured["axes"]
    assert [ax.get_title() for ax in axes] == ["rollout reward", "rollout accuracy",
                                              "evaluation: accuracy (ODE, fixed seeds)",
                                              "evaluation: reward (ODE, fixed seeds)"]
    assert all(ax.get_xlabel() == "step" and ax.get_ylabel() for ax in axes)
    band = axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0  # mean +- 0.4 would leave [0, 1] unclipped
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[1] > 1000


def test_labelled_grid_puts_prompt_and_reward_under_legible_cells(tmp_path):
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = [f"a photo of {i} red cubes on a very long wooden table beside a window" for i in range(10)]
    report.labelled_grid(images, tmp_path / "g.png", prompts=prompts, scores=[i / 10 for i in range(10)],
                         title="after training")
    grid = Image.open(tmp_path / "g.png")
    assert grid.width >= 10 * 160 and grid.height >= 160 + 40  # ten 8x8 digits in one row, cells >= 160 px
    pixels = torch.from_numpy(np.asarray(grid.convert("L")).copy())
    below = pixels[26 + 8 + 160 + 2:26 + 8 + 160 + 40, 8:168]  # the text lines under the first cell
    assert (below < 128).sum() > 50  # dark text is drawn there
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        report.labelled_grid(torch.rand(3, 8), tmp_path / "bad.png")


def test_fit_wraps_to_two_lines_and_ellipsises():
    font = report._font(13)
    lines = report._fit("word " * 60, font, 160)
    assert len(lines) == 2 and lines[-1].endswith("\u2026")
    assert all(font.getlength(line) <= 160 for line in lines)
