"""`awm-fast train` starting its own processes (awm_fast/train/launch.py): how many, the batch-split refusal with
the nearest settings that work, and a 2-process CPU run through the launcher (gloo, run.nproc=2 forced) that equals
a torchrun run of the same config: the same metrics and the same LoRA weights, bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from awm_fast.cli import main
from awm_fast.config import ConfigError, load_config
from awm_fast.train import launch
from awm_fast.train.launch import plan_processes, split_problem
from tests.train.hooked_cli import hooked_env, kill_tree

TIMING = {"time_sample", "time_reward", "time_reward_wait", "time_train", "time_step", "images_per_s"}
TINY = ["run.tensorboard=false", "run.eval_every=0", "run.threads=1", "run.device=cpu", "run.dist_backend=gloo",
        "digits.eval_per_digit=2", "sample.eval_num_steps=4", "sample.num_steps=6", "sample.prompts_per_step=4",
        "sample.group_size=4", "sample.batch_size=8", "train.micro_batch=4", "train.num_timesteps=2",
        "train.steps=2", "run.checkpoint_every=2", "run.nproc=2"]


def test_process_count_follows_gpus_and_nproc(monkeypatch):
    cpu = load_config("digits", ["sample.batch_size=40"])
    assert plan_processes(cpu, env={}) == 1  # the default on a CPU device: one process, as before
    assert plan_processes(load_config("digits", ["sample.batch_size=40", "run.nproc=2"]), env={}) == 2
    assert plan_processes(load_config("digits", ["sample.batch_size=40", "run.nproc=2"]),
                          env={"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0"}) == 1  # a torchrun worker
    monkeypatch.setattr("awm_fast.env.pick_device", lambda name, option="": torch.device(
        "cuda" if name == "auto" else name))  # a node with GPUs, as the launcher sees it
    gpu = load_config("geneval_sd35m", ["model.path=/ckpt"])
    assert plan_processes(gpu, env={}, gpus=8) == 8 and plan_processes(gpu, env={}, gpus=1) == 1
    gpu.run.device = "cuda:3"
    assert plan_processes(gpu, env={}, gpus=8) == 1  # one named GPU
    gpu.run.device = "auto"
    gpu.run.nproc = 4
    assert plan_processes(gpu, env={}, gpus=8) == 4
    gpu.run.nproc = 9
    with pytest.raises(ConfigError, match="run.nproc=9 but this node has 8 visible GPUs"):
        plan_processes(gpu, env={}, gpus=8)


@pytest.mark.parametrize("preset,world", [("geneval_sd35m", 5), ("geneval_sd35m", 7), ("pickscore_sd35m", 5),
                                          ("digits", 3)])
def test_a_batch_that_does_not_split_names_settings_that_do(preset, world):
    cfg = load_config(preset, ["model.path=/ckpt"] if preset != "digits" else ["sample.batch_size=8",
                                                                                 "train.micro_batch=4"])
    problem = split_problem(cfg, world, 8)
    assert problem is not None and f"over {world} processes" in problem
    fixes = problem.split("nearest settings that work: ")[1].split("; ")
    assert fixes
    for fix in fixes:  # every suggestion, applied alone, splits
        key, values = fix.split("=")
        for value in values.split(" or "):
            other = load_config(preset, (["model.path=/ckpt"] if preset != "digits" else
                                         ["sample.batch_size=8", "train.micro_batch=4"]) + [f"{key}={value}"])
            assert split_problem(other, int(value) if key == "run.nproc" else world, 8) is None, fix


def test_the_cli_refuses_before_anything_loads(capsys, monkeypatch):
    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("launched a batch that does not split"))
    code = main(["train", "run.device=cpu", "run.nproc=2", "sample.batch_size=80"])  # digits: 80 images per step
    err = capsys.readouterr().err
    assert code == 2 and "over 2 processes" in err and "sample.batch_size=40" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_launcher_run_equals_torchrun_run(tmp_path):
    from awm_fast.config import DigitsConfig
    from awm_fast.tasks.digits import prepare_digits

    prepare_digits(DigitsConfig())  # the shared cache, before two launches race to build it
    common = [*TINY, f"run.output_dir={tmp_path}"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                "-m", "awm_fast.cli", "train", *common, "run.name=torchrun"]
    ours = [sys.executable, "-m", "awm_fast.cli", "train", *common, "run.name=launched"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=hooked_env())
             for cmd in (torchrun, ours)]
    try:
        logs = [p.communicate(timeout=500)[0] for p in procs]
    finally:
        for p in procs:
            kill_tree(p.pid)  # the launchers' workers too, should a run hang
    assert [p.returncode for p in procs] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "[launch] 2 processes on this node" in logs[1] and "[launch]" not in logs[0]
    assert logs[1].count("summary: ") == 1  # rank 0 alone reports
    a, b = tmp_path / "torchrun", tmp_path / "launched"
    assert len(_rows(a)) == 2 and _rows(a) == _rows(b)
    for s in (json.loads((run / "summary.json").read_text()) for run in (a, b)):
        assert s["world_size"] == 2
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    assert sa["eval_after"] == sb["eval_after"] and sa["eval_after_ema"] == sb["eval_after_ema"]
    for adapter in ("default", "ema"):
        wa, wb = (load_file(run / "checkpoints" / "step_000002" / adapter / "pytorch_lora_weights.safetensors")
                  for run in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(wa[k].abs().sum() > 0 for k in wa)  # trained weights, not an untouched zero init
