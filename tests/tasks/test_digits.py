"""The digits task's preparation leaves the process's random state alone: a run on an empty cache computes what
the same command computes on a warm one (issue 26, item 8)."""
import json

import torch

from awm_fast.config import DigitsConfig, load_config
from awm_fast.tasks.digits import prepare_digits
from awm_fast.train.trainer import train
from tests.train.test_faults import TINY

CHEAP = DigitsConfig(pretrain_steps=3, pretrain_batch=16, classifier_steps=3)  # its own cache key: always cold here


def _prepare_from(state: torch.Tensor, cfg: DigitsConfig):
    """prepare_digits(cfg) started from the global RNG state `state`; (artifacts, the global state after it)."""
    torch.set_rng_state(state)
    art = prepare_digits(cfg)
    return art, torch.get_rng_state()


def test_a_cold_cache_leaves_the_global_rng_where_a_warm_one_does(tmp_path, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1234)
    torch.rand(7)  # some state that is not a fresh seed's
    start = torch.get_rng_state()
    cold, after_cold = _prepare_from(start, CHEAP)  # builds: pretraining + classifier
    warm, after_warm = _prepare_from(start, CHEAP)  # reads the cache
    assert torch.equal(after_cold, after_warm)
    assert cold.model_dir == warm.model_dir and (cold.model_dir.parent / "done.json").is_file()
    again = tmp_path / "again"  # a second cold build gives the same artifacts (its own fixed seeds)
    monkeypatch.setenv("AWM_FAST_CACHE", str(again))
    rebuilt = prepare_digits(CHEAP)
    assert all(torch.equal(a, b) for a, b in zip(cold.classifier.state_dict().values(),
                                                 rebuilt.classifier.state_dict().values()))
    assert cold.classifier_accuracy == rebuilt.classifier_accuracy


def test_cold_and_warm_cache_runs_are_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    cheap = [f"digits.pretrain_steps={CHEAP.pretrain_steps}", f"digits.pretrain_batch={CHEAP.pretrain_batch}",
             f"digits.classifier_steps={CHEAP.classifier_steps}"]
    rows = {}
    for name in ("cold", "warm"):  # the first run builds the cache, the second reads it
        cfg = load_config(None, [*TINY, *cheap, f"run.output_dir={tmp_path}", f"run.name={name}", "train.steps=2"])
        train(cfg)
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    timing = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "images_per_s"))}
    assert len(rows["cold"]) == 2
    assert [timing(r) for r in rows["cold"]] == [timing(r) for r in rows["warm"]]
