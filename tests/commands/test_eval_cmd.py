"""`awm-fast eval` scores through the trainer's one retry layer and time limit, and a dead reward server stops
it in one line before the model loads and before the output folder is made."""
from awm_fast.cli import main
from awm_fast.commands.eval_cmd import build_rewards
from awm_fast.config import load_config
from awm_fast.rewards.http_server import bind
from awm_fast.train.faults import RetryingReward


def test_eval_rewards_get_reward_retries_and_timeout_s():
    cfg = load_config("digits", ["reward.timeout_s=7", "reward.retries=1"])
    rewards = build_rewards(cfg, ["jpeg_compressibility", "http@{url: http://127.0.0.1:1}"], None)
    assert list(rewards) == ["jpeg_compressibility", "http"]
    assert all(isinstance(r, RetryingReward) and r.timeout_s == 7 and r.retries == 1 for r in rewards.values())
    assert rewards["http"].reward.url == "http://127.0.0.1:1"


def test_a_dead_reward_server_stops_eval_in_one_line(tmp_path, capsys):
    with bind("127.0.0.1", 0) as closed:
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    out = tmp_path / "out"
    assert main(["eval", "--base", "--config", "digits", "--reward", f"http@{{url: {dead}}}", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no answer from the reward server at {dead}" in err[0], err
    assert not out.exists()
