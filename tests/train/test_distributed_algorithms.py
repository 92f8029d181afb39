"""Flow-GRPO, DiffusionNFT and AWM's shared batch under torchrun (2 gloo processes) compute what 1 process
computes, and a 1-process checkpoint resumes on 2 processes as the uninterrupted 1-process run.

The four 2-process runs share ONE torchrun launch (tests/train/dist_runs.py: one interpreter start per rank);
the 1-process references run in this process meanwhile. Tolerances as tests/train/test_distributed.py (step 1:
the same rows, only the all-reduce's summation order differs; step 2: that rounding after one Adam step).

Flow-GRPO runs with its default two optimizer steps per rollout: its parts are round robin over the micro-batches
(part s = micro-batches i with i mod 2 = s), the same global micro-batches on 1 and 2 processes (a split of each
rank's own share into halves gave {0, 2} | {1, 3} on 2 processes against {0, 1} | {2, 3} on 1).
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tolerances import tol
from tests.train.test_distributed import LAUNCHED, TIMING, TORCHRUN, _kill, _kill_all, _rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
# 16 images per step = one rollout batch of 8 per rank, micro-batches of 4; 10 evaluation prompts
TINY = ["run.tensorboard=false", "run.eval_every=0", "run.threads=1", "run.device=cpu", "run.dist_backend=gloo",
        "digits.eval_per_digit=1", "sample.eval_num_steps=4", "sample.num_steps=6", "sample.prompts_per_step=4",
        "sample.group_size=4", "sample.batch_size=8", "train.micro_batch=4", "train.num_timesteps=2",
        "train.steps=2", "run.checkpoint_every=1", "run.keep_checkpoints=3"]
RUNS = {
    "grpo": ["train.algorithm=flow_grpo", "sample.sampler=euler_maruyama", "sample.noise_level=0.7",
             "flow_grpo.optimizer_steps=2"],
    "nft": ["train.algorithm=nft"],
    "shared": ["train.shared_batch=true"],
}


def _argv(out: Path, name: str, *extra) -> list[str]:
    return ["train", *TINY, f"run.output_dir={out}", f"run.name={name}", *extra]


def _one_process(out: Path, name: str, *extra) -> None:
    from awm_fast.cli import main

    assert main(_argv(out, name, *extra)) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from awm_fast.config import DigitsConfig
    from awm_fast.tasks.digits import prepare_digits

    prepare_digits(DigitsConfig())
    out = tmp_path_factory.mktemp("dist_algos")
    threads = torch.get_num_threads()  # the in-process runs set run.threads=1
    try:
        _one_process(out, "shared_1", *RUNS["shared"])  # its step-1 checkpoint is the resume's start
        shutil.copytree(out / "shared_1", out / "cut")
        shutil.rmtree(out / "cut" / "checkpoints" / "step_000002")
        argvs = [_argv(out, f"{n}_2", *extra) for n, extra in RUNS.items()]
        argvs.append(["train", "--resume", str(out / "cut")])
        (out / "runs.json").write_text(json.dumps(argvs))
        with open(out / "launch.log", "wb") as log:
            proc = subprocess.Popen(TORCHRUN + ["--nproc_per_node", "2", "-m", "tests.train.dist_runs",
                                                str(out / "runs.json")], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        LAUNCHED.append(proc)
        for name in ("grpo", "nft"):  # meanwhile
            _one_process(out, f"{name}_1", *RUNS[name])
        try:
            code = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            _kill(proc, stacks=True)
            raise AssertionError("the torchrun launch still running after 400 s; its log, ending with the stacks of "
                                 f"its processes:\n{(out / 'launch.log').read_text()[-12000:]}") from None
        assert code == 0, (out / "launch.log").read_text()[-3000:]
        yield out
    finally:
        _kill_all()
        torch.set_num_threads(threads)


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert all(set(ra) == set(rb) for ra, rb in zip(a, b))
    return max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in ra if k not in TIMING)


def _lora(run: Path, step: int, adapter: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / adapter / "pytorch_lora_weights.safetensors"))


def _assert_same_weights(one: Path, two: Path) -> None:
    """Both adapters of the final checkpoint: the policy (trained) and the EMA/"old" one."""
    for adapter in ("default", "ema"):
        a, b = _lora(one, 2, adapter), _lora(two, 2, adapter)
        assert a.keys() == b.keys() and len(a) > 0
        flat = lambda w: torch.cat([w[k].flatten().double() for k in sorted(w)])
        rel = float((flat(b) - flat(a)).norm() / flat(a).norm())
        assert rel < tol(torch.float32)["rtol"], (adapter, rel)
    init = _lora(one, 1, "default")  # and the weights did move: an update that did nothing would pass above
    assert any(not torch.equal(init[k], a[k]) for k in a)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_compute_what_one_process_computes(runs, name):
    one, two = runs / f"{name}_1", runs / f"{name}_2"
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [1, 2]
    assert _max_diff(a[:1], b[:1]) < 1e-7, name  # step 1: same samples, rewards, advantages, rows
    assert _max_diff(a, b) < 1e-5, name  # step 2: float rounding of the gradient sum order only
    assert all(r["grad_norm"] > 0 and r["skipped"] == 0 for r in a + b)
    _assert_same_weights(one, two)
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["eval_before"] == pytest.approx(s2["eval_before"], abs=1e-9)
    assert s1["eval_after"] == pytest.approx(s2["eval_after"], abs=1e-5)


def test_a_one_process_checkpoint_resumes_on_two_processes(runs):
    log = (runs / "launch.log").read_text()
    assert f"[resume] {runs / 'cut' / 'checkpoints' / 'step_000001'} at step 1 (saved on 1 processes, now 2" in log
    resumed, full = _rows(runs / "cut"), _rows(runs / "shared_1")
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed[0] == full[0]  # the restored history, as it was written
    assert _max_diff(resumed, full) < 1e-5  # step 2 on 2 processes from the 1-process weights + Adam state
    _assert_same_weights(runs / "shared_1", runs / "cut")
    s1, s2 = (json.loads((runs / n / "summary.json").read_text()) for n in ("shared_1", "cut"))
    assert s2["world_size"] == 2 and s1["eval_after"] == pytest.approx(s2["eval_after"], abs=1e-5)
