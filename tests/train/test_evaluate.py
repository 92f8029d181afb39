"""Evaluation noise is seeded per sample: the same evaluation at any batch size gives the same samples and metrics
(and so at any process count: ranks split the batches, see test_distributed's eval_before equality)."""
import torch

from awm_fast.config import load_config
from awm_fast.rewards.digits import DigitsReward
from awm_fast.families.digits import build_policy
from awm_fast.tasks.digits import prepare_digits
from awm_fast.train.evaluate import evaluate


def test_evaluation_is_the_same_at_every_batch_size():
    cfg = load_config(None, ["run.device=cpu"])
    art = prepare_digits(cfg.digits)
    policy = build_policy(cfg, torch.device("cpu"), torch.float32, [])
    reward = DigitsReward(art.classifier)
    prompts = [str(d) for d in range(10)] * 2  # 20 samples
    metadata = [{} for _ in prompts]
    runs = [evaluate(policy, reward, prompts, metadata, num_steps=4, seed=7, batch_size=b) for b in (3, 8, 20)]
    m0, img0 = runs[0].metrics, runs[0].images
    assert img0.shape[0] == len(prompts) and img0.std() > 0.05
    assert runs[0].rewards.shape == (len(prompts),) and abs(runs[0].rewards.mean() - m0["reward"]) < 1e-9
    for ev in runs[1:]:
        metrics, images = ev.metrics, ev.images
        assert torch.allclose(images, img0, atol=1 / 255)  # uint8 previews: at most one level of rounding apart
        assert torch.allclose(ev.rewards, runs[0].rewards, atol=1e-6)
        assert metrics.keys() == m0.keys()
        for key in m0:
            assert abs(metrics[key] - m0[key]) < 1e-6, (key, metrics[key], m0[key])
    # the seed does move the samples: the equality above is not of constant outputs
    moved = evaluate(policy, reward, prompts, metadata, num_steps=4, seed=8, batch_size=8).images
    assert (moved - img0).abs().max() > 0.1
