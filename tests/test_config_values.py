"""Values that cannot work are refused up front (awm_fast/config.py validate, load_config), through
`awm-fast check-config`: one line naming the key, exit code 2 (issue 26, item 6)."""
import pytest

from awm_fast.cli import main
from awm_fast.config import MAX_LORA_RANK, ConfigError, load_config
from awm_fast.rewards import unknown_option


def _refused(capsys, argv: list[str]) -> str:
    assert main(["check-config", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("awm-fast: config error: ") and captured.out == "", captured
    return err[0]


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr=inf"), ("train.beta=.inf", "train.beta=inf"),
    ("sample.guidance_scale=.nan", "sample.guidance_scale=nan"), ("reward.weights=[.nan]", "reward.weights[0]=nan"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm=inf"), ("run.dist_timeout_s=.inf", "run.dist_timeout_s=inf"),
    ("train.lr=-.inf", "train.lr=-inf"), ("train.weight_decay=nan", "train.weight_decay=nan"),
    ("sample.shift=.nan", "sample.shift=nan"), ("train.adam_beta2=.nan", "train.adam_beta2=nan"),
    ("reward.options={scale: [1.0, .inf]}", "reward.options.scale[1]=inf"),
])
def test_a_non_finite_number_is_refused_naming_the_key(capsys, override, key):
    line = _refused(capsys, [override])
    assert f"{key}: must be a finite number" in line, line


def test_a_lora_rank_beyond_any_layer_is_refused(capsys):
    assert load_config(None, [f"model.lora_rank={MAX_LORA_RANK}"]).model.lora_rank == MAX_LORA_RANK
    line = _refused(capsys, ["model.lora_rank=100000000"])
    assert f"model.lora_rank=100000000 exceeds {MAX_LORA_RANK}" in line, line
    assert "model.lora_rank" in _refused(capsys, ["model.lora_rank=1e8"])  # YAML 1.1 reads 1e8 as a string


@pytest.mark.parametrize("argv, message", [
    (["reward.options={colour: red}"], "reward.options.colour: not an option of reward 'digits' (it takes: no options)"),
    (["reward.name=jpeg_compressibility", "reward.options={qualty: 80}"],
     "reward.options.qualty: not an option of reward 'jpeg_compressibility' (it takes: quality)"),
    (["reward.name=jpeg_compressibility", "reward.options={compressible: false}"],  # fixed by the name
     "reward.options.compressible: not an option"),
    (["reward.name=digits+jpeg_compressibility", "reward.options={jpeg_compressibility: {qualty: 80}}"],
     "reward.options.jpeg_compressibility.qualty: not an option"),
    (["reward.name=digits+jpeg_compressibility", "reward.options={quality: 80}"],
     "reward.options.quality: not an option of reward 'digits+jpeg_compressibility' (it takes: one mapping per "
     "component: digits, jpeg_compressibility)"),
    (["reward.name=digits+jpeg_compressibility", "reward.options={jpeg_compressibility: 80}"],
     "reward.options.jpeg_compressibility: not an option"),
])
def test_an_unknown_reward_option_is_refused_naming_the_key(capsys, argv, message):
    assert message in _refused(capsys, argv)


def test_the_options_a_reward_takes_pass():
    cfg = load_config(None, ["reward.name=digits+jpeg_compressibility",
                             "reward.options={jpeg_compressibility: {quality: 80}}"])
    assert cfg.reward.options == {"jpeg_compressibility": {"quality": 80}}
    assert unknown_option("http", {"url": "http://127.0.0.1:1", "batch_size": 4}) is None
    assert unknown_option("tests.rewards.user_rewards:anything", {"any": 1}) is None  # known only once imported


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\xff\xfe\x89PNG", "not a UTF-8 text file (byte 2: 0xff)"),
    (b"train:\n  lr: \xe9\n", "not a UTF-8 text file (byte 13: 0xe9)"),
    (b"train:\n  lr: 0.1\x00\n", "not valid YAML"),
    (b"- train\n- sample\n", "expected a mapping of sections, got list"),
    (b"just text", "expected a mapping of sections, got str"),
    (b"train: [1, 2]", "section 'train' must be a mapping"),
    (b"train:\n  lr: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
])
def test_a_binary_or_non_mapping_yaml_file_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    line = _refused(capsys, ["--config", str(path)])
    assert str(path) in line and message in line, line
    with pytest.raises(ConfigError):
        load_config(str(path))
