"""The papers' form of the benchmark numbers (awm_fast.train.paper_metrics) against hand-computed cases."""
import pytest
import torch

from awm_fast.train.paper_metrics import GENEVAL_TASKS, geneval, ocr, paper_metrics, pickscore


def test_geneval_overall_is_the_mean_of_the_task_accuracies(gen):
    tags = list(GENEVAL_TASKS) * 3 + ["counting"] * 5  # unequal task sizes: Overall is not the image mean
    correct = (torch.rand(len(tags), generator=gen) > 0.4).float().tolist()
    rows = [{"reward": 0.5, "geneval_strict": c, "geneval_accuracy": 1.0} for c in correct]
    got = geneval(rows, [{"tag": t} for t in tags])
    per_task = {GENEVAL_TASKS[t]: sum(c for c, u in zip(correct, tags) if u == t) / tags.count(t) for t in GENEVAL_TASKS}
    assert list(got.values) == ["Overall", *GENEVAL_TASKS.values()]  # the paper's column order
    assert got.values["Overall"] == pytest.approx(sum(per_task.values()) / 6)
    assert {k: got.values[k] for k in per_task} == pytest.approx(per_task)
    assert got.counts["Counting"] == 8 and got.counts["Overall"] == len(tags)
    assert got.line().startswith("GenEval: Overall ")


def test_geneval_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="has no 'geneval_strict' score"):
        geneval([{"reward": 1.0}], [{"tag": "colors"}])
    with pytest.raises(ValueError, match="tag 'digit'"):
        geneval([{"geneval_strict": 1.0}], [{"tag": "digit"}])


def test_ocr_accuracy_and_raw_pickscore(gen):
    r = torch.rand(7, generator=gen).tolist()
    assert ocr([{"reward": x} for x in r]).values == {"Accuracy": pytest.approx(sum(r) / 7)}
    assert pickscore([{"reward": x} for x in r], divisor=26.0).values == {"Mean": pytest.approx(26 * sum(r) / 7)}


def test_paper_metrics_picks_the_benchmark_rewards_by_name(gen):
    class Pick:
        divisor = 20.0

    r = torch.rand(4, generator=gen).tolist()
    rows = [{"pickscore/reward": x, "jpeg_compressibility/reward": 1.0, "reward": x} for x in r]
    got = paper_metrics({"pickscore": Pick(), "jpeg_compressibility": object()}, rows, [{}] * 4)
    assert [p.benchmark for p in got] == ["PickScore"] and got[0].values["Mean"] == pytest.approx(20 * sum(r) / 4)
    assert paper_metrics({"jpeg_compressibility": object()}, [{"reward": 1.0}], [{}]) == []
    single = paper_metrics({"ocr": object()}, [{"reward": x} for x in r], [{}] * 4)
    assert single[0].values["Accuracy"] == pytest.approx(sum(r) / 4)
