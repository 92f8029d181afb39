"""Progress where people look: a tqdm bar on a terminal, one log line every `every_s` seconds otherwise.

Every bar of the project follows one rule (`awm_fast.logs.progress_bar`): shown only on the main rank and when
stderr, where tqdm draws, is a terminal. Where no bar shows (a scheduler's log file, `| tee`), the training
loop prints instead, at most once per `every_s` seconds (0: every step), and always at the last step:

    [step 12/150] reward 0.512 | loss 0.0123 | kl 0.0001 | 0.35 s/step | 228.6 img/s | ETA 0:00:48

ETA = (steps left) x (mean seconds of the steps this process ran).
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable

logger = logging.getLogger(__name__)


def _short(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


class StepLines:
    """Per-step lines for runs whose stdout is not a terminal (see the module docstring)."""

    def __init__(self, total: int, start: int, *, every_s: float, enabled: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.total, self.start, self.every_s, self.enabled, self.clock = total, start, every_s, enabled, clock
        self.seconds, self.last = 0.0, None

    def update(self, step: int, metrics: dict[str, float], step_s: float) -> str | None:
        """Records step `step` (1-based) of `step_s` seconds; logs and returns its line when one is due."""
        self.seconds += step_s
        now = self.clock()
        due = step == self.total or self.last is None or now - self.last >= self.every_s
        if not self.enabled or not due:
            return None
        self.last = now
        done = step - self.start
        eta = datetime.timedelta(seconds=round(self.seconds / max(done, 1) * (self.total - step)))
        parts = [f"reward {_short(metrics['reward_mean'])}"]
        parts += [f"{key} {_short(metrics[key])}" for key in ("loss", "kl") if key in metrics]
        parts += [f"{step_s:.3g} s/step", f"{metrics.get('images_per_s', 0.0):.4g} img/s", f"ETA {eta}"]
        line = f"[step {step}/{self.total}] " + " | ".join(parts)
        logger.info(line)
        return line
