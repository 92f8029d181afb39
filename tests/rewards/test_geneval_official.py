"""The GenEval client's official settings: JPEG at PIL's default quality, only_strict while training and off in
evaluation (awm_fast.rewards.base.evaluation_mode reaches it through the trainer's wrappers)."""
import io

import torch
from PIL import Image

from awm_fast.rewards.base import evaluation_mode
from awm_fast.rewards.combined import CombinedReward
from awm_fast.rewards.geneval import GenEvalReward, encode_jpeg
from awm_fast.train.faults import RetryingReward
from tests.rewards.test_geneval import Server, batch


def test_jpeg_at_pil_default_quality(gen):
    images = torch.rand(2, 3, 32, 32, generator=gen)
    ours = encode_jpeg(images)
    array = (images[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")  # the official client: no quality argument
    assert ours[0] == buf.getvalue()


def test_only_strict_in_training_not_in_evaluation():
    server = Server()
    try:
        geneval = GenEvalReward(url=server.url, timeout=10)
        wrapped = RetryingReward(CombinedReward([geneval]), retries=0, wait_s=0.0)
        images, prompts, meta, _ = batch(2)
        wrapped(images, prompts, meta)
        with evaluation_mode(wrapped):
            wrapped(images, prompts, meta)
        wrapped(images, prompts, meta)
        assert [r["only_strict"] for r in server.requests] == [True, False, True]
    finally:
        server.close()
