"""Progress where people look: per-step lines when stdout is not a terminal, none on one (the bar shows there)."""
import logging

import pytest

from awm_fast import logs
from awm_fast.config import ConfigError, load_config
from awm_fast.train import progress
from awm_fast.train.trainer import train
from tests.train.test_faults import TINY

METRICS = {"reward_mean": 0.51234, "loss": 0.0123, "kl": 1.5e-5, "images_per_s": 228.61}


def test_step_lines_are_rate_limited_and_always_print_the_last_step():
    now = [0.0]
    lines = progress.StepLines(10, 2, every_s=30.0, enabled=True, clock=lambda: now[0])
    out = []
    for step in range(3, 11):
        now[0] += 12.0  # 12 s per step: a line at most every 30 s
        out.append(lines.update(step, METRICS, 12.0))
    printed = [line for line in out if line]
    assert [line.split("]")[0] for line in printed] == ["[step 3/10", "[step 6/10", "[step 9/10", "[step 10/10"]
    assert printed[0] == ("[step 3/10] reward 0.5123 | loss 0.0123 | kl 1.50e-05 | 12 s/step | 228.6 img/s | "
                          "ETA 0:01:24")  # 7 steps left x 12 s
    assert printed[-1].endswith("ETA 0:00:00")
    quiet = progress.StepLines(10, 0, every_s=0.0, enabled=False)
    assert quiet.update(10, METRICS, 1.0) is None
    with pytest.raises(ValueError, match="-1"):
        progress.StepLines(10, 0, every_s=-1.0, enabled=True)


def test_a_run_logging_to_a_file_prints_a_line_per_step(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logs, "on_terminal", lambda: False)  # pytest's stderr is no terminal either
    caplog.set_level(logging.INFO, logger="awm_fast")
    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "run.name=r", "train.steps=2", "run.log_every_s=0"])
    train(cfg)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[step ")]
    assert [s.split("]")[0] for s in steps] == ["[step 1/2", "[step 2/2"]
    assert all(" | loss " in s and " | kl " in s and " img/s | ETA " in s for s in steps)


def test_log_every_s_must_be_non_negative():
    with pytest.raises(ConfigError, match="run.log_every_s"):
        load_config(None, ["run.log_every_s=-5"])


def test_every_bar_follows_one_rule(monkeypatch):
    monkeypatch.setattr(logs, "on_terminal", lambda: True)
    assert not logs.progress_bar(range(3)).disable and logs.progress_bar(range(3), main=False).disable
    monkeypatch.setattr(logs, "on_terminal", lambda: False)
    assert logs.progress_bar(range(3)).disable
