"""benchmarks/convergence.py --quick with a tiny override writes its table, plot and JSON with every field."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convergence.py"


@pytest.mark.slow
def test_quick_mode_writes_every_output(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--quick", "--steps", "2", "--seeds", "1", "--eval-every", "1", "--eval-per-digit", "2",
                       "--variance-batches", "2", "--target", "0.05", "--out", str(tmp_path), "--tag", "test"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("AWM speedup to 5% accuracy") and "Flow-GRPO" in last and "DiffusionNFT" in last
    result = json.loads((tmp_path / "convergence_test.json").read_text())
    assert {"mode", "args", "sweep", "images_per_step", "machine", "runs", "summary", "speedups", "variance",
            "variance_ratio_to_awm", "total_seconds"} <= set(result)
    assert set(result["summary"]) == set(result["variance"]) == {"awm", "flow_grpo", "nft"}
    for m, s in result["summary"].items():
        assert s["reached"] == 1 and s["ttt_images"]["mean"] == 0  # 5% accuracy: reached before training
        for key in ("ttt_seconds", "ttt_images", "final_accuracy", "final_reward", "step_seconds"):
            assert {"mean", "std", "min", "max"} <= set(s[key]) and s[key]["mean"] is not None
        v = result["variance"][m]
        assert v["batches"] == 2 and v["rel_var"] > 0 and -1 <= v["mean_cosine"] <= 1 and v["mean_grad_norm"] > 0
    for m in ("flow_grpo", "nft"):  # AWM's time-to-target is 0: no ratio rather than a division by zero
        assert result["speedups"][m]["images"]["ratio"] is None and result["speedups"][m]["seconds"]["ratio"] is None
    for run in result["runs"]:
        assert [e["step"] for e in run["evals"]] == [0, 1, 2] and run["evals"][0]["images"] == 0
        assert run["evals"][-1]["images"] == 2 * result["images_per_step"] and run["evals"][-1]["seconds"] > 0
    md = (tmp_path / "convergence_test.md").read_text()
    assert "| AWM |" in md and "| Flow-GRPO |" in md and "| DiffusionNFT |" in md and "rel_var" in md
    assert (tmp_path / "convergence_test.png").stat().st_size > 10_000
