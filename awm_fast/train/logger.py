"""Per-step metrics to `metrics.jsonl`, TensorBoard and (run.wandb) Weights & Biases, built on rank 0 only: the
other ranks write nothing. Evaluations go to `evals.jsonl` (one line each: {"step", "weights": "raw" | "ema",
"metrics": {name: value}}), TensorBoard and wandb; the end-of-run images to TensorBoard and wandb
(`log_images`); metrics.jsonl holds the per-step rows only."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, history: list[dict] | None = None, wandb=None,
                 evals: list[dict] | None = None) -> None:
        """wandb: a `train.wandb_logger.WandbRun` (or None). evals: the trainer's list of evaluation rows, which
        grows during the run; new rows are logged before the next step's row (wandb's steps only go forward)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.evals_path = Path(run_dir) / "evals.jsonl"
        self.history: list[dict] = list(history or [])
        self.writer, self.wandb = None, wandb
        self.evals, self.evals_logged = evals if evals is not None else [], 0
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        # On resume, rewrite the file to exactly the restored history (drops rows past the checkpoint); the
        # restored evaluations are written again by the first flush_evals.
        with self.path.open("w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        self.evals_path.write_text("")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.flush_evals()
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, row)

    def flush_evals(self) -> None:
        """The evaluation rows {"step", "weights", metric: value} not logged yet: a line of evals.jsonl each, and
        eval/<metric>/<weights> scalars."""
        new, self.evals_logged = self.evals[self.evals_logged:], len(self.evals)
        for e in new:
            values = {k: float(v) for k, v in e.items() if k not in ("step", "weights")}
            with self.evals_path.open("a") as f:
                f.write(json.dumps({"step": e["step"], "weights": e["weights"], "metrics": values}) + "\n")
            scalars = {f"eval/{k}/{e['weights']}": v for k, v in values.items()}
            if self.writer is not None:
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, e["step"])
            if self.wandb is not None:
                self.wandb.log(e["step"], scalars)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """PNG files (the curves, the before/after grid) under their names."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            for name, path in images.items():
                self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log_images(images, step)

    def log_eval_grid(self, evaluation, prompts: list[str], step: int, weights: str) -> Path:
        """The first 20 samples of an evaluation as a labelled grid (prompt and reward under each image):
        evals/step_NNNNNN_<weights>.png, also logged to TensorBoard / wandb as eval_samples/<weights>."""
        from awm_fast.train.report import labelled_grid

        n = min(20, len(evaluation.images))
        path = self.path.parent / "evals" / f"step_{step:06d}_{weights}.png"
        path.parent.mkdir(exist_ok=True)
        labelled_grid(evaluation.images[:n], path, prompts=prompts[:n], scores=evaluation.rewards[:n].tolist(),
                      title=f"evaluation at step {step} ({weights} weights)")
        self.log_images({f"eval_samples/{weights}": path}, step)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
