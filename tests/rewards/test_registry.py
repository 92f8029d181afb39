"""load_reward / build_reward, user rewards by import path, CombinedReward, JPEG, config names."""
import pytest
import torch
from PIL import Image

from awm_fast.config import CHOICES, ConfigError, load_config
from awm_fast.rewards import REWARDS, CombinedReward, build_reward, load_reward
from awm_fast.rewards.base import to_pil, to_uint8_arrays
from awm_fast.rewards.jpeg import jpeg_sizes_kb

PATH = "tests.rewards.user_rewards"


@pytest.fixture
def images(gen):
    return torch.rand(3, 3, 16, 24, generator=gen)


def test_user_function_by_import_path(images):
    out = load_reward(f"{PATH}:brightness", scale=2.0)(images, ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(out["reward"], 2 * images.mean(dim=(1, 2, 3)))
    out = load_reward(f"{PATH}:brightness_dict")(images, ["a"] * 3, [{}] * 3)
    assert set(out) == {"reward", "red"}
    torch.testing.assert_close(out["red"], images[:, 0].mean(dim=(1, 2)))
    assert load_reward(f"{PATH}:Sleepy", seconds=0).name == "sleepy"
    with pytest.raises(ValueError, match="1 scores for 3 images"):
        load_reward(f"{PATH}:wrong_length")(images, ["a"] * 3, [{}] * 3)


@pytest.mark.parametrize("path, match", [("no_such_module_xyz:fn", "cannot import"), (f"{PATH}:nope", "no attribute"),
                                         ("unknown_reward", "unknown reward")])
def test_bad_names(path, match):
    with pytest.raises(ValueError, match=match):
        load_reward(path)


def test_combined_weighted_sum_logs_components(images):
    name = f"jpeg_compressibility+{PATH}:brightness"
    out = load_reward(name, weights=[0.5, 2.0], **{f"{PATH}:brightness": {"scale": 3.0}})(images, ["a"] * 3, [{}] * 3)
    kb, bright = jpeg_sizes_kb(images), 3.0 * images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["reward"], 0.5 * -kb + 2.0 * bright)
    torch.testing.assert_close(out["jpeg_compressibility"], -kb)
    torch.testing.assert_close(out[f"{PATH}:brightness"], bright)
    torch.testing.assert_close(out["jpeg_kb"], kb)
    both = CombinedReward([load_reward("jpeg_compressibility"), load_reward("jpeg_incompressibility")])
    res = both(images, ["a"] * 3, [{}] * 3)
    assert res["reward"].abs().max() == 0 and "jpeg_incompressibility.jpeg_kb" in res


def test_combined_errors():
    with pytest.raises(ValueError, match="2 weights for 3 rewards"):
        load_reward("jpeg_compressibility+jpeg_incompressibility+" + f"{PATH}:brightness", weights=[1, 2])
    with pytest.raises(ValueError, match="do not name a component"):
        load_reward("jpeg_compressibility+jpeg_incompressibility", pickscore={})
    with pytest.raises(ValueError, match="distinct"):
        load_reward("jpeg_compressibility+jpeg_compressibility")
    with pytest.raises(ValueError, match="single reward"):
        load_reward("jpeg_compressibility", weights=[2.0])
    with pytest.raises(TypeError, match="bad option"):
        load_reward("jpeg_compressibility", colour=1)


def test_options_are_checked_against_the_builder_signature(monkeypatch):
    """A bad option is told from a TypeError raised while building by binding the options to the builder's
    signature (the reward class less its fixed options), not by the error's text."""
    assert load_reward("jpeg_incompressibility", quality=40).quality == 40
    for name, options in (("jpeg_incompressibility", {"compressible": True}), ("digits", {"colour": 1}),
                          ("ocr", {"min_confidence": 0.5, "engine_name": "x"})):
        with pytest.raises(TypeError, match=f"reward '{name}': bad option"):
            load_reward(name, **options)

    def needs_scale(scale):
        raise TypeError("an argument of the wrong type, raised inside the builder")

    monkeypatch.setitem(REWARDS, "needs_scale", needs_scale)
    with pytest.raises(TypeError, match="bad option.*missing a required argument: 'scale'"):
        load_reward("needs_scale")
    with pytest.raises(TypeError, match="raised inside the builder") as info:
        load_reward("needs_scale", scale=2)
    assert "bad option" not in str(info.value)


def test_build_reward_for_the_trainer(images):
    with pytest.raises(ValueError, match="classifier"):
        build_reward("digits")
    r = build_reward("jpeg_incompressibility+jpeg_compressibility", weights=[1.0, 1.0])
    assert r.name == "jpeg_incompressibility+jpeg_compressibility"
    assert r(images, ["a"] * 3, [{}] * 3)["reward"].abs().max() == 0
    assert build_reward("jpeg_compressibility", weights=[]).name == "jpeg_compressibility"


def test_jpeg_accepts_pil_and_grey(images):
    pil = to_pil(images)
    assert torch.equal(jpeg_sizes_kb(pil), jpeg_sizes_kb(images))
    grey = torch.rand(2, 1, 8, 8)
    assert to_uint8_arrays(grey)[0].shape == (8, 8, 3)
    assert load_reward("jpeg_compressibility")([Image.new("L", (8, 8))], ["a"], [{}])["reward"].shape == (1,)
    with pytest.raises(TypeError, match="PIL"):
        to_uint8_arrays(["not an image"])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_uint8_arrays(torch.rand(3, 8, 8))


def test_config_names_match_registry():
    assert set(CHOICES["reward.name"]) == set(REWARDS)
    cfg = load_config("pickscore_sd35m", [f"reward.name=pickscore+{PATH}:brightness", "reward.weights=[1, 0.5]"])
    assert cfg.reward.weights == [1.0, 0.5]
    assert load_config("ocr_sd35m", [f"reward.name={PATH}:brightness"]).reward.name.endswith(":brightness")
    with pytest.raises(ConfigError, match="package.module:function"):
        load_config("ocr_sd35m", ["reward.name=nonsense"])
