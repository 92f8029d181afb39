import json

from awm_fast.train.logger import MetricsLogger


def test_evaluations_go_to_evals_jsonl_once_each_and_a_resume_rewrites_them(tmp_path):
    evals = [{"step": 0, "weights": "raw", "reward": 0.25, "accuracy": 0.5}]
    logger = MetricsLogger(tmp_path, tensorboard=False, evals=evals)
    logger.log(1, {"reward_mean": 0.3})
    evals += [{"step": 1, "weights": "raw", "reward": 0.75, "accuracy": 0.625},
              {"step": 1, "weights": "ema", "reward": 0.5, "accuracy": 0.375}]
    logger.flush_evals()
    logger.flush_evals()  # nothing new: nothing written
    rows = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "weights": "raw", "metrics": {"reward": 0.25, "accuracy": 0.5}},
                    {"step": 1, "weights": "raw", "metrics": {"reward": 0.75, "accuracy": 0.625}},
                    {"step": 1, "weights": "ema", "metrics": {"reward": 0.5, "accuracy": 0.375}}]
    resumed = MetricsLogger(tmp_path, tensorboard=False, history=logger.history, evals=evals[:1])
    assert (tmp_path / "evals.jsonl").read_text() == ""
    resumed.log(2, {"reward_mean": 0.4})
    assert [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()] == rows[:1]
