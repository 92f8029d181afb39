"""Per-step metrics to `metrics.jsonl` and TensorBoard (built on rank 0 only: the other ranks write nothing)."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, history: list[dict] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history: list[dict] = list(history or [])
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        # On resume, rewrite the file to exactly the restored history (drops rows past the checkpoint).
        with self.path.open("w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
