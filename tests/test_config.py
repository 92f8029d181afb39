import pytest

from awm_fast.config import ConfigError, list_presets, load_config


def test_default_is_digits():
    cfg = load_config()
    assert cfg.model.kind == "digits" and cfg.reward.name == "digits"


@pytest.mark.parametrize("preset", ["geneval_sd35m", "ocr_sd35m", "pickscore_sd35m", "geneval_sd35l"])
def test_official_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.model.kind == "sd3" and cfg.train.num_timesteps == 6 and cfg.sample.num_steps == 14
    assert cfg.train.weighting == "ghuber" and cfg.train.ghuber_power == 0.25
    assert cfg.model.lora_rank == 32 and cfg.model.lora_alpha == 64


@pytest.mark.parametrize("preset", ["geneval_flux_dev", "geneval_flux_schnell"])
def test_flux_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.model.kind == "flux" and cfg.model.path.startswith("black-forest-labs/FLUX.1-")
    assert cfg.train.weighting == "ghuber" and cfg.model.lora_rank == 32


def test_presets_listed():
    assert {"digits", "geneval_sd35m", "ocr_sd35m", "pickscore_sd35m"} <= set(list_presets())


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.steps=7", "run.tensorboard=false",
                             "reward.name=digits+jpeg_compressibility",  # options keyed by a component it has
                             "reward.options={jpeg_compressibility: {quality: 90}}"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7 and cfg.run.tensorboard is False
    assert cfg.reward.options == {"jpeg_compressibility": {"quality": 90}}


@pytest.mark.parametrize("override,match", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["optim.lr=1"], "unknown config section 'optim'"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["train.lr=fast"], "train.lr: expected a number"),
    (["run.tensorboard=2"], "run.tensorboard: expected true/false"),
    (["reward.options=[1, 2]"], "reward.options: expected a mapping"),
    (["sample.group_size=1"], "group_size=1"),
    (["train.micro_batch=7"], "train.micro_batch=7 does not divide"),
    (["sample.batch_size=7"], "sample.batch_size=7 does not divide"),
    (["train.weighting=l1"], "train.weighting='l1'"),
    (["train.num_timesteps=50"], "train.num_timesteps=50"),
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["reward.name=pickscore"], "does not apply to model.kind=digits"),
    (["lr=1"], "section.key"),
    (["train.lr"], "section.key=value"),
])
def test_bad_values_raise_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, override)
    assert "\n" not in str(info.value)


def test_unknown_file_or_preset():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no_such_preset")


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(str(path))


def test_cli_config_error_writes_nothing(tmp_path, capsys):
    from awm_fast.cli import main

    code = main(["train", f"run.output_dir={tmp_path / 'out'}", "sample.group_size=1"])
    assert code == 2
    assert "config error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_batch_size_default_and_check():
    assert load_config(None).sample.eval_batch_size == 0  # 0: max(sample.batch_size, 64), as before
    assert load_config("pickscore_wan").sample.eval_batch_size == 4  # videos: a few per call
    with pytest.raises(ConfigError, match="sample.eval_batch_size"):
        load_config(None, ["sample.eval_batch_size=-1"])
