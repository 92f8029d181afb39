"""Videos (N, F, C, H, W) through the rewards: image rewards per frame (mean, per-frame std), clip rewards whole,
combinations and the retry wrapper dispatching per component, the async scorer; the GIF / frame previews."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from awm_fast.rewards import CombinedReward, load_reward
from awm_fast.rewards.async_scorer import AsyncRewardScorer
from awm_fast.rewards.base import FRAME_STD, score_batch, takes_video
from awm_fast.rewards.jpeg import jpeg_sizes_kb
from awm_fast.train.faults import RetryingReward
from awm_fast.train.previews import frame_indices, frame_strip, write_previews


class Brightness:
    """An image reward: mean pixel value (+ the red channel's as a sub-score); records what it was called with."""

    name = "brightness"

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata):
        if images.ndim != 4:
            raise ValueError(f"an image reward got shape {tuple(images.shape)}")
        self.calls.append((images.shape, list(prompts), list(metadata)))
        return {"reward": images.mean((1, 2, 3)), "red": images[:, 0].mean((1, 2))}


class Motion:
    """A clip reward: mean absolute change between consecutive frames."""

    name = "motion"
    takes_video = True

    def __call__(self, videos, prompts, metadata):
        if videos.ndim != 5:
            raise ValueError(f"a clip reward got shape {tuple(videos.shape)}")
        return {"reward": (videos[:, 1:] - videos[:, :-1]).abs().mean((1, 2, 3, 4))}


@pytest.fixture
def videos(gen):
    return torch.rand(3, 5, 3, 8, 6, generator=gen)


def test_image_reward_scores_each_frame_mean_and_std(videos):
    reward = Brightness()
    prompts, meta = ["a", "b", "c"], [{"i": 0}, {"i": 1}, {"i": 2}]
    out = score_batch(reward, videos, prompts, meta)
    (shape, got_prompts, got_meta), = reward.calls  # one call over all 15 frames
    assert shape == (15, 3, 8, 6)
    assert got_prompts == [p for p in prompts for _ in range(5)] and got_meta == [m for m in meta for _ in range(5)]
    per_frame = torch.stack([torch.stack([videos[i, f].mean() for f in range(5)]) for i in range(3)])
    torch.testing.assert_close(out["reward"], per_frame.mean(1))
    torch.testing.assert_close(out[FRAME_STD], per_frame.std(1, unbiased=False))
    torch.testing.assert_close(out["red"], videos[:, :, 0].mean((2, 3)).mean(1))
    assert out["reward"].shape == (3,) and set(out) == {"reward", "red", FRAME_STD}
    images = videos[:, 0]
    torch.testing.assert_close(score_batch(reward, images, prompts, meta)["reward"], images.mean((1, 2, 3)))


def test_registered_jpeg_reward_on_video_is_the_mean_frame_size(videos):
    out = score_batch(load_reward("jpeg_compressibility"), videos, ["a"] * 3, [{}] * 3)
    sizes = jpeg_sizes_kb(videos.flatten(0, 1)).view(3, 5)
    torch.testing.assert_close(out["jpeg_kb"], sizes.mean(1))
    torch.testing.assert_close(out["reward"], -sizes.mean(1))
    torch.testing.assert_close(out[FRAME_STD], sizes.std(1, unbiased=False))


def test_clip_reward_gets_the_whole_video_also_wrapped(videos):
    motion = Motion()
    want = (videos[:, 1:] - videos[:, :-1]).abs().mean((1, 2, 3, 4))
    torch.testing.assert_close(score_batch(motion, videos, ["a"] * 3, [{}] * 3)["reward"], want)
    retrying = RetryingReward(motion, retries=0)
    assert takes_video(retrying) and not takes_video(Brightness())
    torch.testing.assert_close(score_batch(retrying, videos, ["a"] * 3, [{}] * 3)["reward"], want)


def test_combined_reward_dispatches_videos_per_component(videos):
    both = CombinedReward([Brightness(), Motion()], weights=[2.0, -1.0])
    out = score_batch(both, videos, ["a"] * 3, [{}] * 3)
    bright = videos.mean((2, 3, 4)).mean(1)
    motion = (videos[:, 1:] - videos[:, :-1]).abs().mean((1, 2, 3, 4))
    torch.testing.assert_close(out["reward"], 2 * bright - motion)
    torch.testing.assert_close(out["brightness"], bright)
    torch.testing.assert_close(out["motion"], motion)
    assert FRAME_STD in out  # the frame reward's per-frame spread


def test_async_scorer_scores_videos(videos):
    with AsyncRewardScorer(Brightness(), num_workers=0) as scorer:
        scorer.submit(videos, ["a"] * 3, [{}] * 3)
        scorer.submit(videos[:2], ["b"] * 2, [{}] * 2)
        first, second = scorer.gather()
    assert first["reward"].shape == (3,) and second["reward"].shape == (2,)
    torch.testing.assert_close(first[FRAME_STD][:2], second[FRAME_STD])


def test_frame_indices_and_strip(videos):
    assert frame_indices(33) == [0, 11, 21, 32] and frame_indices(5) == [0, 1, 3, 4]
    assert frame_indices(2) == [0, 1] and frame_indices(1) == [0]
    strip = frame_strip(videos)
    assert strip.shape == (3, 3, 8, 4 * 6)
    torch.testing.assert_close(strip[1, :, :, 6:12], videos[1, 1])
    with pytest.raises(ValueError, match="N, F, C, H, W"):
        frame_strip(videos[:, 0])


def test_previews_write_gifs_frames_and_an_index(tmp_path, videos):
    written = write_previews(videos, tmp_path / "p", ["a cat", "a dog", "a cow"], max_videos=2, fps=16)
    assert [p.name for p in written] == ["0000.gif", "0001.gif"]
    with Image.open(written[1]) as gif:
        assert gif.n_frames == 5 and gif.size == (6, 8) and gif.info["duration"] == 60
        gif.seek(2)
        frame = torch.from_numpy(np.asarray(gif.convert("RGB"))).float() / 255  # (H, W, 3)
    assert (frame.permute(2, 0, 1) - videos[1, 2]).abs().mean() < 0.05  # GIF palette quantisation
    with Image.open(tmp_path / "p" / "0000_frames.png") as png:
        assert png.size == (4 * 6, 8)
    index = json.loads((tmp_path / "p" / "previews.json").read_text())
    assert [(e["index"], e["prompt"]) for e in index] == [(0, "a cat"), (1, "a dog")]
    write_previews(videos[:1], tmp_path / "p", ["a bird"], first_index=1, max_videos=2)  # merged, replaced
    index = json.loads((tmp_path / "p" / "previews.json").read_text())
    assert [(e["index"], e["prompt"]) for e in index] == [(0, "a cat"), (1, "a bird")]
    assert write_previews(videos, tmp_path / "q", ["x"] * 3, first_index=8) == []
