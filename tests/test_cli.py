"""`awm-fast presets | check-config | tiny sd3 | tiny flux` and the train command's report and error lines
(awm_fast/cli.py); eval / sample / export / serve-reward: tests/commands, --resume: tests/train/test_resume_config.py."""
import json

import pytest
import yaml

from awm_fast.cli import _report, main
from awm_fast.config import PRESET_DIR, load_config


def test_presets_lists_every_bundled_preset(capsys):
    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) and len(names) >= 8
    assert {"digits", "geneval_sd35m", "geneval_sd35m_flow_grpo_fast", "geneval_flux_dev"} <= set(names)


@pytest.mark.parametrize("argv", [[], ["train.lr=0.002", "sample.group_size=8"],
                                  ["--config", "geneval_sd35m_flow_grpo_fast", "train.steps=7"]])
def test_check_config_prints_the_resolved_config(capsys, argv):
    assert main(["check-config", *argv]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    config = argv[1] if argv[:1] == ["--config"] else None
    overrides = [a for a in argv if "=" in a]
    assert printed == load_config(config, overrides).to_dict()  # every key, as `train` would use it
    if overrides == ["train.lr=0.002", "sample.group_size=8"]:
        assert printed["train"]["lr"] == 0.002 and printed["sample"]["group_size"] == 8
    if config:
        assert printed["train"]["algorithm"] == "flow_grpo" and printed["train"]["steps"] == 7


@pytest.mark.parametrize("argv, message", [
    (["check-config", "train.nope=1"], "unknown config key 'train.nope'"),
    (["check-config", "--config", "no_such_preset"], "no_such_preset"),
    (["check-config", "train.algorithm=ppo"], "train.algorithm='ppo'"),
    (["train", "train.lr"], "train.lr"),
])
def test_a_bad_config_is_one_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("awm-fast: config error: ") and message in err[0], err
    assert captured.out == ""


@pytest.mark.parametrize("rank, world, prefix", [("0", None, "awm-fast: error: "), ("1", "2", "awm-fast: error (rank 1): ")])
def test_a_training_failure_is_one_line_exit_code_1_naming_the_rank(capsys, monkeypatch, rank, world, prefix):
    from awm_fast.train import trainer
    from awm_fast.train.distributed import TrainingError

    def fails(cfg, resume=None):
        raise TrainingError("rank 1/2: the update failed\n  (details)")

    monkeypatch.setattr(trainer, "train", fails)
    monkeypatch.setenv("RANK", rank)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "train.steps=1"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{prefix}rank 1/2: the update failed (details)"]  # whitespace folded
    assert "summary:" not in captured.out


def test_the_train_report_states_each_change(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"eval_before": {"reward": 0.25, "accuracy": 0.3},
                                "eval_after": {"reward": 0.4375, "accuracy": 0.55, "new_metric": 1.0},
                                "train_seconds": 12.4}))
    _report(path)
    assert capsys.readouterr().out.splitlines() == [
        "reward: 0.2500 -> 0.4375 (+0.1875)", "accuracy: 0.3000 -> 0.5500 (+0.2500)",
        "accuracy before 30.0%, after 55.0%: +25.0 points in 12 s of training", f"summary: {path}"]


@pytest.mark.parametrize("kind, pipeline", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_tiny_pipelines_are_written_where_asked(tmp_path, capsys, kind, pipeline):
    target = tmp_path / kind
    assert main(["tiny", kind, str(target)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(target)
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    for part in ("transformer", "vae", "scheduler", "text_encoder"):
        assert (target / part).is_dir() and index[part][0] is not None, part


def test_tiny_refuses_an_unknown_family_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tiny", "sd5", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "invalid choice: 'sd5'" in err[0] and "sd3" in err[0]
    assert not (tmp_path / "x").exists()
