"""`awm-fast train --resume` continues a run with its own saved config: overrides on top and listed, a
non-resumable change refused with one line and exit code 2, and kill -9 + a bare resume reproducing the
uninterrupted run exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from awm_fast.cli import main
from awm_fast.config import NON_RESUMABLE, load_config
from awm_fast.train.resume import ResumeError, config_changes, non_resumable, resume_config
from tests.train.hooked_cli import HOOKED_CLI, hooked_env
from tests.train.test_faults import TINY

TIMING = {"time_sample", "time_reward", "time_reward_wait", "time_train", "time_step", "images_per_s"}


def _fake_run(tmp_path, *overrides, where="checkpoint"):
    """A run folder with one checkpoint holding only a step and the config (written `where`)."""
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", "run.name=r", "train.steps=6", *overrides])
    ckpt = tmp_path / "r" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    torch.save({"step": 3, **({"config": cfg.to_dict()} if where == "state" else {})}, ckpt / "state.pt")
    target = {"checkpoint": ckpt / "config.yaml", "run": tmp_path / "r" / "config.yaml"}.get(where)
    if target is not None:
        target.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, tmp_path / "r"


@pytest.mark.parametrize("where", ["checkpoint", "state", "run"])
def test_resume_takes_the_saved_config_and_lists_the_changes(tmp_path, where):
    saved, run = _fake_run(tmp_path, "train.lr=0.002", where=where)
    cfg, changes, ckpt = resume_config(run)
    assert cfg == saved and changes == [] and ckpt.name == "step_000003"
    cfg, changes, _ = resume_config(run, ["train.steps=20", "run.eval_every=2"])
    assert cfg.train.steps == 20 and cfg.train.lr == 0.002 and cfg.sample.group_size == saved.sample.group_size
    assert [str(c) for c in changes] == ["train.steps 6 -> 20", "run.eval_every 0 -> 2"]


def test_a_non_resumable_change_names_the_key(tmp_path):
    _, run = _fake_run(tmp_path)
    for override, key in (("sample.group_size=8", "sample.group_size"), ("model.lora_rank=8", "model.lora_rank"),
                          ("train.algorithm=nft", "train.algorithm"), ("train.seed=1", "train.seed"),
                          ("digits.pretrain_steps=3", "digits.pretrain_steps")):
        with pytest.raises(ResumeError, match=rf"^cannot resume with {key} changed"):
            resume_config(run, [override])
    assert all(non_resumable(k) for k in NON_RESUMABLE if not k.endswith("."))
    assert not non_resumable("train.steps") and not non_resumable("run.eval_every") and not non_resumable("train.lr")
    assert config_changes(load_config(None), load_config(None, ["model.compile=true"]))[0].key == "model.compile"


@pytest.mark.parametrize("argv, message", [
    (["--resume", "RUN", "sample.batch_size=4"], "awm-fast: config error: cannot resume with sample.batch_size changed"),
    (["--resume", "RUN", "--config", "digits"], "awm-fast: config error: --config digits with --resume"),
    (["--resume", "RUN", "train.nope=1"], "awm-fast: config error: unknown config key 'train.nope'"),
    (["--resume", "MISSING"], "awm-fast: error: no checkpoint in"),
])
def test_bad_resumes_stop_with_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    _, run = _fake_run(tmp_path)
    argv = [str(run) if a == "RUN" else str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_nothing_to_resume_says_what_to_do_in_one_line(tmp_path, capsys):
    saved, run = _fake_run(tmp_path, "train.steps=3")  # its checkpoint: step 3 of train.steps=3
    assert main(["train", "--resume", str(run)]) == 2  # bare: nothing left to do
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("awm-fast: error: the run of ") and "is complete (step 3 of " \
        "train.steps=3)" in err[0] and f"--resume {run} train.steps=6" in err[0], err
    cfg, changes, _ = resume_config(run, ["train.steps=6"])  # longer: goes on
    assert cfg.train.steps == 6 and [str(c) for c in changes] == ["train.steps 3 -> 6"]
    fresh = tmp_path / "fresh"  # killed before its first checkpoint: a config.yaml and no checkpoints/
    fresh.mkdir()
    (fresh / "config.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
    assert main(["train", "--resume", str(fresh)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"awm-fast: error: nothing to resume in {fresh}") and \
        f"awm-fast train --config {fresh / 'config.yaml'}" in err[0], err


def test_the_python_api_refuses_a_non_resumable_change_too(tmp_path):
    from awm_fast.train.trainer import train

    saved, run = _fake_run(tmp_path)
    saved.train.micro_batch = 8
    with pytest.raises(ResumeError, match="train.micro_batch"):
        train(saved, resume=str(run))


def _rows(run):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_then_a_bare_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    args = [*TINY, f"run.output_dir={tmp_path}", "train.steps=6", "run.checkpoint_every=2", "train.lr=0.01"]
    assert main(["train", *args, "run.name=full"]) == 0
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", HOOKED_CLI, "train", *args, "run.name=killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**hooked_env(), "AWM_FAST_PAUSE_AT": "update:5", "AWM_FAST_PAUSE_MARKER": str(marker)})
    try:
        end = time.monotonic() + 240
        while not marker.exists():  # parked inside step 5, after its update, before its log row
            assert proc.poll() is None and time.monotonic() < end, "never reached the pause point"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = tmp_path / "killed"
    assert len(_rows(killed)) == 4 and (killed / "config.yaml").is_file() and not (killed / "summary.json").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(killed)]) == 0  # bare: no config, no overrides
    out = capsys.readouterr().out
    assert f"[resume] {killed}/checkpoints/step_000004 with its saved config\n" in out and "changed" not in out
    assert _rows(killed) == _rows(tmp_path / "full") and len(_rows(killed)) == 6
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("full", "killed"))
    for key in ("eval_before", "eval_after", "eval_after_ema"):
        assert a[key] == b[key], key
    capsys.readouterr()
    assert main(["train", "--resume", str(killed), "train.steps=8"]) == 0  # a longer run, listed in the log
    assert "resuming with changed: train.steps 6 -> 8" in capsys.readouterr().out
    assert len(_rows(killed)) == 8 and _rows(killed)[:6] == _rows(tmp_path / "full")
