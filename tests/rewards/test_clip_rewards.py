"""PickScore, CLIPScore and the aesthetic predictor end to end on a tiny random CLIP, against hand computations."""
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from awm_fast.rewards.aesthetic import AestheticHead, AestheticReward
from awm_fast.rewards.base import to_pil
from awm_fast.rewards.clipscore import ClipScoreReward
from awm_fast.rewards.pickscore import PickScoreReward

PROMPTS = ["a red cat", "a photo of a dog", "blue sky"]


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 48, generator=g)


def reference_embeds(folder, images, prompts):
    """Unit-norm embeddings through CLIPModel.forward (a different code path from the rewards' get_*_features)."""
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = proc(images=to_pil(images), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds.float(), out.text_embeds.float(), model.logit_scale.exp().item()


def test_pickscore_matches_official_formula(tiny_clip, images):
    reward = PickScoreReward(processor=tiny_clip, model=tiny_clip, device="cpu")
    out = reward(images, PROMPTS, [{}] * 3)
    img, txt, scale = reference_embeds(tiny_clip, images, PROMPTS)
    expected = scale * (img * txt).sum(-1) / 26
    assert out["reward"].shape == (3,) and torch.isfinite(out["reward"]).all()
    assert abs(scale - 24.53) < 0.01  # the fixture's logit_scale, not CLIP's default
    torch.testing.assert_close(out["reward"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward(to_pil(images), PROMPTS, [{}] * 3)["reward"], out["reward"])


def test_clipscore_is_clamped_cosine(tiny_clip, images):
    out = ClipScoreReward(model=tiny_clip, device="cpu", weight=2.5)(images, PROMPTS, [{}] * 3)
    img, txt, _ = reference_embeds(tiny_clip, images, PROMPTS)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(out["clip_cosine"], cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["reward"], 2.5 * cos.clamp_min(0), atol=1e-5, rtol=1e-5)
    assert (out["clip_cosine"].abs() <= 1 + 1e-6).all()


def test_aesthetic_head_on_normalised_embedding(tiny_clip, images, tmp_path):
    torch.manual_seed(1)
    head = AestheticHead(16).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    out = AestheticReward(head=str(tmp_path / "head.pth"), model=tiny_clip, device="cpu")(images, PROMPTS, [{}] * 3)
    img, _, _ = reference_embeds(tiny_clip, images, PROMPTS)
    with torch.no_grad():
        expected = head(img / img.norm(dim=-1, keepdim=True))
    assert out["reward"].shape == (3,)
    torch.testing.assert_close(out["reward"], expected, atol=1e-5, rtol=1e-5)
    assert sorted(head.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]  # the released file's key layout


def test_aesthetic_without_weights_is_one_clear_line(tiny_clip, tmp_path):
    for head in (None, str(tmp_path / "missing.pth")):
        with pytest.raises(FileNotFoundError, match="aesthetic") as info:
            AestheticReward(head=head, model=tiny_clip, device="cpu")
        assert "\n" not in str(info.value) and "head=" in str(info.value)
    torch.save(AestheticHead(8).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="16-d"):
        AestheticReward(head=str(tmp_path / "wrong.pth"), model=tiny_clip, device="cpu")


def test_missing_model_is_one_clear_line(tmp_path, monkeypatch, tiny_clip):
    with pytest.raises(FileNotFoundError) as info:
        PickScoreReward(processor=tiny_clip, model=str(tmp_path / "no_such_model"), device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "'pickscore'" in msg and "no_such_model" in msg and "model=PATH" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:  # a hub id, offline, not cached
        PickScoreReward(processor=tiny_clip, model="awm-fast-test/no-such-model", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "awm-fast-test/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "download" in msg


def test_prompt_count_must_match(tiny_clip, images):
    reward = ClipScoreReward(model=tiny_clip, device="cpu")
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        reward(images, PROMPTS[:2], [{}] * 3)
