"""Scale-out and recovery on CPU: torchrun with gloo, 2 processes vs 1, resume (also on another world size),
SIGKILL in the middle of a step and of a checkpoint write, and a hung rank stopping the others.

The launch lines are those of docs/training.md, with `run.device=cpu run.dist_backend=gloo`:
    torchrun --standalone --nproc_per_node 2 -m awm_fast.cli train ...
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from tests.tolerances import tol
from tests.train.hooked_cli import HOOKED_CLI, hooked_env, kill_tree

# The module's runs start in the first test's setup (3 trainers on 2 cores): a longer limit than the suite's.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone"]

TIMING = {"time_sample", "time_reward", "time_reward_wait", "time_train", "time_step", "images_per_s"}
# 16 images per step in rollout batches of 8 (one per rank on 2 ranks), micro-batches of 4; 130 evaluation
# prompts = 3 evaluation batches (sharded over the ranks).
TINY = ["run.tensorboard=false", "run.eval_every=0", "run.threads=1", "run.device=cpu", "run.dist_backend=gloo",
        "digits.eval_per_digit=13", "sample.eval_num_steps=4", "sample.num_steps=6", "sample.prompts_per_step=4",
        "sample.group_size=4", "sample.batch_size=8", "train.micro_batch=4", "train.num_timesteps=2",
        "train.steps=4", "run.checkpoint_every=1", "run.keep_checkpoints=3"]


LAUNCHED: list[subprocess.Popen] = []  # every process _launch started; the fixtures kill them all at teardown


def _launch(out: Path, name: str, nproc: int | None, *extra, env=None) -> subprocess.Popen:
    """nproc None: one plain process (`python -m awm_fast.cli train`), else torchrun with nproc processes; `_kill`
    ends all of a launch (torchrun's workers included)."""
    head = [sys.executable, "-m", HOOKED_CLI] if nproc is None else \
        TORCHRUN + ["--nproc_per_node", str(nproc), "-m", HOOKED_CLI]
    cmd = head + ["train", *TINY, f"run.output_dir={out}", f"run.name={name}", *extra]
    with open(out / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**hooked_env(), **(env or {})},
                                start_new_session=True)
    LAUNCHED.append(proc)
    return proc


def _kill(proc: subprocess.Popen, stacks: bool = False) -> None:
    """SIGKILL the launch's processes (a torchrun agent and its workers; with `stacks`, after each hooked process
    printed its stacks to the launch's log), then reap it."""
    kill_tree(proc.pid, stacks_s=2.0 if stacks else 0.0)
    proc.wait()


def _kill_all() -> None:
    while LAUNCHED:
        _kill(LAUNCHED.pop())


def _finish(proc: subprocess.Popen, out: Path, name: str, timeout: float = 300) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, stacks=True)
        raise AssertionError(f"{name} still running after {timeout} s; its log, ending with the stacks of its "
                             f"processes:\n{(out / f'{name}.log').read_text()[-12000:]}") from None
    assert code == 0, (out / f"{name}.log").read_text()[-3000:]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert all(set(ra) == set(rb) for ra, rb in zip(a, b))
    return max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in ra if k not in TIMING)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before reaching the pause point"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.2)


def _launch_hung_pair(out: Path, store) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two ranks launched without torchrun (whose agent would tear the group down itself), as on a node whose
    peer node died: rank 1 stops answering inside step 2 (parked by the test hook). Their rendezvous store is
    `store`, a TCPStore this process serves on a port it bound as port 0 (both ranks connect to it as clients,
    the way torchrun's agent store is used), so no port is picked, released and hoped to be still free."""
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
    extra = ["run.dist_timeout_s=20", "train.shared_batch=true", "run.checkpoint_every=0", "digits.eval_per_digit=1"]
    r0 = _launch(out, "hang", None, *extra, env={**base, "RANK": "0", "LOCAL_RANK": "0"})
    r1 = _launch(out, "hang", None, *extra, env={**base, "RANK": "1", "LOCAL_RANK": "1", "AWM_FAST_PAUSE_AT": "update:2",
                                                 "AWM_FAST_PAUSE_RANKS": "1", "AWM_FAST_PAUSE_MARKER": str(out / "hung")})
    return r0, r1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 1-process run and the same run on 2 processes (gloo), each dumping its all-reduced
    gradients of every optimizer step; the hung-rank pair starts beside them (its timeout overlaps their work)."""
    from awm_fast.config import DigitsConfig
    from awm_fast.tasks.digits import prepare_digits

    prepare_digits(DigitsConfig())  # the shared cache, before any short collective timeout
    out = tmp_path_factory.mktemp("dist")
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        hung = _launch_hung_pair(out, store)
        one = _launch(out, "one", None, env={"AWM_FAST_GRAD_DUMP": str(out / "grads_one")})
        two = _launch(out, "two", 2, env={"AWM_FAST_GRAD_DUMP": str(out / "grads_two")})
        _finish(one, out, "one")
        _finish(two, out, "two")
        yield out, hung
    finally:
        _kill_all()  # the hung pair, and whatever a failed or timed-out test left running
        del store


def test_two_processes_compute_what_one_process_computes(runs):
    runs, _ = runs
    one, two = _rows(runs / "one"), _rows(runs / "two")
    assert len(one) == len(two) == 4  # rank 0 alone writes the metrics
    assert _max_diff(one[:1], two[:1]) < 1e-7  # step 1: same samples, rewards, advantages, rows; grads all-reduced
    assert _max_diff(one, two) < 1e-5  # later steps: float rounding of the gradient sum order only
    grads = lambda run: [torch.load(p) for p in sorted((runs / f"grads_{run}").glob("*.pt"))]
    g1, g2 = grads("one"), grads("two")
    assert len(g1) == len(g2) == 4
    flat = lambda tensors: torch.cat([t.flatten() for t in tensors])
    rel = [float((flat(b) - flat(a)).norm() / flat(a).norm()) for a, b in zip(g1, g2)]
    # step 1: the same weights, so only the all-reduce's summation order differs (measured ~5e-8); after it the
    # weights differ by that rounding, which Adam's first steps amplify (measured up to ~6e-6 by step 3)
    assert rel[0] < 1e-6, rel
    assert max(rel) < tol(torch.float32)["rtol"], rel
    s1, s2 = (json.loads((runs / n / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["eval_before"] == pytest.approx(s2["eval_before"], abs=1e-9)  # sharded evaluation, gathered
    assert s1["eval_after"] == pytest.approx(s2["eval_after"], abs=1e-5)
    assert s2["world_size"] == 2 and (runs / "two" / "samples_before_after.png").stat().st_size > 0


def test_a_two_process_run_resumes_on_one_process(runs):
    runs, _ = runs
    cut = runs / "cut"
    shutil.copytree(runs / "two", cut)
    for step in (3, 4):
        shutil.rmtree(cut / "checkpoints" / f"step_00000{step}")
    proc = subprocess.run([sys.executable, "-m", "awm_fast.cli", "train", *TINY, f"run.output_dir={runs}",
                           "--resume", str(cut)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved on 2 processes, now 1" in proc.stdout
    resumed = _rows(cut)
    assert _max_diff(resumed[:2], _rows(runs / "two")[:2]) == 0  # restored history
    assert _max_diff(resumed, _rows(runs / "one")) < 1e-5


def test_sigkill_in_a_step_and_in_a_checkpoint_write_then_resume(runs):
    """Kill -9 inside step 3 (after its backward), resume; kill -9 while writing checkpoint 3, resume; the
    metrics equal the uninterrupted run's exactly."""
    runs, _ = runs
    name, marker = "killed", runs / "paused"
    run = runs / name
    for pause, resume in (("update:3", False), ("checkpoint:3", True)):
        marker.unlink(missing_ok=True)
        extra = ["--resume", str(run)] if resume else []
        proc = _launch(runs, name, None, *extra, env={"AWM_FAST_PAUSE_AT": pause, "AWM_FAST_PAUSE_MARKER": str(marker)})
        try:
            _wait_for(marker, proc)
        finally:
            _kill(proc)
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert "step_000003" not in names and {"step_000001", "step_000002"} <= set(names), names
    assert any(n.startswith(".tmp_step_000003") for n in names)  # the interrupted write, never taken for a checkpoint
    _finish(_launch(runs, name, None, "--resume", str(run)), runs, name)
    assert _max_diff(_rows(run), _rows(runs / "one")) == 0
    s1, s2 = (json.loads((runs / n / "summary.json").read_text()) for n in ("one", name))
    assert s1["eval_after"] == s2["eval_after"] and s1["eval_after_ema"] == s2["eval_after_ema"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # stale temp folder removed


def test_a_hung_rank_makes_the_other_exit_with_a_clear_error(runs):
    """Rank 1 stops answering inside step 2; rank 0 must not hang: its next collective times out after
    run.dist_timeout_s and it exits with one line naming the problem."""
    out, (r0, r1) = runs
    _wait_for(out / "hung", r1)
    code = r0.wait(timeout=120)
    log = (out / "hang.log").read_text()
    assert code == 1 and r1.poll() is None, log[-2000:]  # rank 0 gave up while rank 1 was still parked
    assert "awm-fast: error (rank 0): rank 0/2:" in log and "run.dist_timeout_s=20" in log, log[-2000:]
    assert "Timed out" in log or "timed out" in log.split("run.dist_timeout_s=20")[1]
    assert len(_rows(out / "hang")) == 1  # step 1 (DDP + shared batch) completed on both ranks
