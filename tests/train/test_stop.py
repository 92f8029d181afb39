"""Clean stops (awm_fast/train/stop.py, issue 26 item 3): SIGTERM / SIGINT end a run after the current step with a
checkpoint, one line naming the resume command and exit code 143 / 130 (no traceback); a second signal exits at
once; every rank stops after the same step; the resumed run equals the uninterrupted one exactly.

The signal comes from the trainer itself at a known point (tests/train/hooked_cli.py: AWM_FAST_SIGNAL_AT, after the
step's update) or, for Ctrl-C on several processes, from the test to the whole process group as a terminal sends it.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from awm_fast.train.distributed import Dist
from awm_fast.train.stop import StopRequest, Stopped, resume_command, stop_on_signals
from tests.train.hooked_cli import HOOKED_CLI, REPO, hooked_env, kill_tree

# 16 images per step (one rollout batch of 8 per rank on 2 ranks), 10 evaluation prompts; no periodic checkpoint:
# the one a stop leaves is the stop's own
TINY = ["run.tensorboard=false", "run.eval_every=0", "run.threads=1", "run.device=cpu", "run.dist_backend=gloo",
        "digits.eval_per_digit=1", "sample.eval_num_steps=4", "sample.num_steps=6", "sample.prompts_per_step=4",
        "sample.group_size=4", "sample.batch_size=8", "train.micro_batch=4", "train.num_timesteps=2",
        "train.steps=3", "run.checkpoint_every=0", "run.keep_checkpoints=3"]
TIMING = {"time_sample", "time_reward", "time_reward_wait", "time_train", "time_step", "images_per_s"}
CODES = {"TERM": 143, "INT": 130}


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _lora(run: Path, step: int, adapter: str = "default") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / adapter / "pytorch_lora_weights.safetensors"))


def _assert_same_run(run: Path, ref: Path) -> None:
    """The metrics of every step, both final adapters and the final evaluations: bit for bit."""
    assert _rows(run) == _rows(ref) and len(_rows(ref)) == 3
    for adapter in ("default", "ema"):
        a, b = _lora(run, 3, adapter), _lora(ref, 3, adapter)
        assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert s1["eval_after"] == s2["eval_after"] and s1["eval_after_ema"] == s2["eval_after_ema"]


def _cli(out: Path, name: str, *extra, env=None, nproc: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", HOOKED_CLI, "train", *TINY, f"run.output_dir={out}", f"run.name={name}",
           f"run.nproc={nproc}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**hooked_env(), **(env or {})}, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid, stacks_s=2.0)  # where each process of the run hung, in the failure's message
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[-3:]} still running after {timeout} s; its stderr, with the stacks of "
                             f"its processes:\n{err[-20000:]}") from None
    return proc.returncode, out, err


def _assert_clean_stop(code: int, err: str, sig: str, run: Path, step: int) -> None:
    assert code == CODES[sig], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = f"awm-fast: stopped by SIG{sig} after step {step} (checkpoint written); resume with: {resume_command(run)}"
    assert err.count(line) == 1, err[-3000:]  # printed once (rank 0); after it, on several processes, only the
    # launcher's (torch.distributed.elastic) notes on the workers' exit codes
    assert _checkpoints(run) == [f"step_{step:06d}"]  # the stop's own checkpoint (run.checkpoint_every=0)
    assert not (run / "summary.json").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process."""
    from awm_fast.cli import main

    out = tmp_path_factory.mktemp("stop")
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, f"run.output_dir={out}", "run.name=ref", "run.checkpoint_every=3"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_the_first_signal_sets_a_flag_and_the_handlers_are_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(forwarded_repeats=False) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        os.kill(os.getpid(), signal.SIGTERM)  # handled here: no exception, no exit
        assert stop.signum == signal.SIGTERM and not stop.stopping
        assert stop.agreed(Dist()) and stop.stopping  # one process: the flag itself, no collective
        stopped = stop.stopped(Path("runs/x"), 7)
    assert signal.getsignal(signal.SIGTERM) == before
    assert isinstance(stopped, Stopped) and stopped.exit_code == 143 and stopped.step == 7
    assert str(stopped).endswith(f"resume with: awm-fast train --resume {Path('runs/x').resolve()}")
    quiet = StopRequest()
    assert not quiet.agreed(Dist()) and not quiet.stopping
    forwarded = StopRequest(forwarded_repeats=True)  # torchrun: the agent forwards the signal a worker already got
    forwarded.handle(signal.SIGINT)
    forwarded.handle(signal.SIGINT)  # within REPEAT_S: the same request, no exit
    assert forwarded.signum == signal.SIGINT


def test_under_torchrun_forwarded_repeats_are_ignored_and_a_later_signal_exits():
    code = ("import os, signal, time\nfrom awm_fast.train import stop as st\nst.REPEAT_S = 3.0\n"
            "with st.stop_on_signals(forwarded_repeats=True) as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(2)\n"  # the agent's forward, 2 s late
            "    os.kill(os.getpid(), signal.SIGINT)\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    print('forwards ignored', flush=True)\n    time.sleep(1.5)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 130 and "forwards ignored" in proc.stdout and "not reached" not in proc.stdout
    assert "awm-fast: second SIGINT: exiting at once" in proc.stderr


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\nfrom awm_fast.train.stop import stop_on_signals\n"
            "with stop_on_signals(forwarded_repeats=False) as stop:\n"
            "    stop.run_dir = 'runs/x'\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\nprint('not reached')\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 143 and "not reached" not in proc.stdout and time.monotonic() - t0 < 25
    assert "awm-fast: second SIGTERM: exiting at once; resume from the last checkpoint with: awm-fast train " \
           "--resume" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_one_process_stops_after_the_step_then_resumes_exactly(reference, sig):
    from awm_fast.cli import main

    run = reference / f"one_{sig}"
    code, _, err = _wait(_cli(reference, run.name, env={"AWM_FAST_SIGNAL_AT": "update:1", "AWM_FAST_SIGNAL": sig}))
    _assert_clean_stop(code, err, sig, run, 1)
    assert f"[stop] SIG{sig}: stopping after this step" in err
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(run)]) == 0  # the printed command
    finally:
        torch.set_num_threads(threads)
    _assert_same_run(run, reference / "ref")


@pytest.mark.slow
@pytest.mark.timeout(600)  # beyond its own waits, which kill a hung run with the stacks of its processes
def test_two_processes_stop_after_the_same_step_then_resume_exactly(tmp_path):
    """SIGTERM to rank 1 alone (rank 0 learns of it through the step's stop agreement) and Ctrl-C to the whole
    process group of `awm-fast train run.nproc=2`, as a terminal sends it (the launcher; torchrun's workers run in
    sessions of their own and get it forwarded by the launcher), in parallel; then the uninterrupted 2-process run and both resumes in one torchrun
    launch (tests/train/dist_runs.py): the resumed runs equal it exactly."""
    out = tmp_path
    term = _cli(out, "two_TERM", nproc=2, env={"AWM_FAST_SIGNAL_AT": "update:1", "AWM_FAST_SIGNAL": "TERM",
                                               "AWM_FAST_SIGNAL_RANKS": "1"})
    marker = out / "two_INT.paused"
    ctrl_c = _cli(out, "two_INT", nproc=2, env={"AWM_FAST_PAUSE_AT": "update:1", "AWM_FAST_PAUSE_RANKS": "0",
                                                "AWM_FAST_PAUSE_MARKER": str(marker), "AWM_FAST_PAUSE_SECONDS": "2"})
    try:
        end = time.monotonic() + 240
        while not marker.exists():
            assert ctrl_c.poll() is None and time.monotonic() < end, "the run ended before its pause point"
            time.sleep(0.2)
        os.killpg(ctrl_c.pid, signal.SIGINT)  # Ctrl-C: launcher and both workers
        results = {name: _wait(p) for name, p in (("TERM", term), ("INT", ctrl_c))}
    finally:
        for p in (term, ctrl_c):
            if p.poll() is None:
                kill_tree(p.pid)
    for sig in ("TERM", "INT"):
        code, _, err = results[sig]
        _assert_clean_stop(code, err, sig, out / f"two_{sig}", 1)
    assert "awm-fast: second" not in results["INT"][2]  # the launcher's forwarded SIGINT is the same request
    runs = [["train", *TINY, f"run.output_dir={out}", "run.name=two_ref", "run.checkpoint_every=3"]]
    (out / "resumes.json").write_text(json.dumps(runs + [["train", "--resume", str(out / f"two_{s}")] for s in CODES]))
    launch = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             "-m", "tests.train.dist_runs", str(out / "resumes.json")], cwd=REPO, timeout=300,
                            capture_output=True, text=True, start_new_session=True)
    assert launch.returncode == 0, launch.stderr[-3000:]
    for sig in CODES:
        _assert_same_run(out / f"two_{sig}", out / "two_ref")
