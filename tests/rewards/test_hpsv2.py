"""HPSv2.1 on tiny random weights in open_clip's checkpoint layout, against a reference open_clip-style CLIP
(torch.nn.MultiheadAttention blocks, argmax pooling) written here: the key mapping onto transformers' CLIPModel
must give the same scores. Nothing is downloaded."""
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers import AutoProcessor

from awm_fast.rewards import load_reward
from awm_fast.rewards.base import to_pil
from awm_fast.rewards.hpsv2 import HPSv2Reward

PROMPTS = ["a red cat", "a photo of a dog", "blue sky"]


class Block(nn.Module):
    """open_clip's ResidualAttentionBlock layout: ln_1, attn (MultiheadAttention), ln_2, mlp.c_fc / c_proj."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 3 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(3 * width, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads) for _ in range(layers))


class ReferenceClip(nn.Module):
    def __init__(self, arch: dict) -> None:
        super().__init__()
        v, t, e = arch["vision_cfg"], arch["text_cfg"], arch["embed_dim"]
        grid = v["image_size"] // v["patch_size"]
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, v["width"], v["patch_size"], v["patch_size"], bias=False)
        self.visual.class_embedding = nn.Parameter(0.1 * torch.randn(v["width"]))
        self.visual.positional_embedding = nn.Parameter(0.1 * torch.randn(grid * grid + 1, v["width"]))
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(v["width"]), nn.LayerNorm(v["width"])
        self.visual.transformer = Tower(v["width"], v["width"] // v["head_width"], v["layers"])
        self.visual.proj = nn.Parameter(0.2 * torch.randn(v["width"], e))
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(0.1 * torch.randn(t["context_length"], t["width"]))
        self.transformer = Tower(t["width"], t["heads"], t["layers"])
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(0.2 * torch.randn(t["width"], e))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for p in self.parameters():  # LayerNorm gains and biases away from 1 / 0 too
            if p.ndim == 1 and p.numel() > 1:
                p.data.add_(0.1 * torch.randn_like(p))

    def encode_image(self, pixels):
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        x = v.ln_post(x[:, 0]) @ v.proj
        return x / x.norm(dim=-1, keepdim=True)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection
        return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny_hps(tiny_clip, tmp_path_factory):
    """(checkpoint .pt in the released {"state_dict": ...} layout, open_clip model-config JSON, reference model)."""
    folder = tmp_path_factory.mktemp("tiny_hps")
    vocab = len(AutoProcessor.from_pretrained(tiny_clip).tokenizer)
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": vocab, "width": 24, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    ref = ReferenceClip(arch).eval()
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, folder / "hps.pt")
    (folder / "config.json").write_text(json.dumps(arch))
    return str(folder / "hps.pt"), str(folder / "config.json"), ref


@pytest.fixture
def images():
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_hpsv2_matches_open_clip_reference(tiny_hps, tiny_clip, images):
    ckpt, arch, ref = tiny_hps
    out = HPSv2Reward(checkpoint=ckpt, processor=tiny_clip, model_config=arch, device="cpu")(images, PROMPTS, [{}] * 3)
    proc = AutoProcessor.from_pretrained(tiny_clip)
    pixels = proc(images=to_pil(images), return_tensors="pt")["pixel_values"]
    ids = proc(text=PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = (ref.encode_image(pixels) * ref.encode_text(ids)).sum(-1)  # diag(img @ txt.T), official score
    assert out["reward"].shape == (3,) and len(set(out["reward"].tolist())) == 3
    torch.testing.assert_close(out["reward"], expected, atol=1e-5, rtol=1e-5)


def test_hpsv2_through_registry_and_combination(tiny_hps, tiny_clip, images):
    ckpt, arch, _ = tiny_hps
    options = dict(checkpoint=ckpt, processor=tiny_clip, model_config=arch, device="cpu")
    alone = load_reward("hpsv2", **options)(images, PROMPTS, [{}] * 3)["reward"]
    both = load_reward("hpsv2+jpeg_compressibility", weights=[2.0, 0.5], hpsv2=options)(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(both["hpsv2"], alone)
    torch.testing.assert_close(both["reward"], 2.0 * alone + 0.5 * both["jpeg_compressibility"])


def test_hpsv2_refuses_bad_checkpoints(tiny_hps, tiny_clip, tmp_path):
    ckpt, arch, ref = tiny_hps
    state = dict(ref.state_dict())
    state.pop("visual.proj")
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="visual_projection.weight"):
        HPSv2Reward(checkpoint=str(tmp_path / "short.pt"), processor=tiny_clip, model_config=arch, device="cpu")
    torch.save({"state_dict": state, "module": Block(4, 1)}, tmp_path / "code.pt")  # unpickling runs code
    with pytest.raises(ValueError, match="weights_only"):
        HPSv2Reward(checkpoint=str(tmp_path / "code.pt"), processor=tiny_clip, model_config=arch, device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint=PATH"):
        HPSv2Reward(checkpoint=str(tmp_path / "absent.pt"), processor=tiny_clip, model_config=arch, device="cpu")


def test_hpsv2_from_a_config(tiny_hps, tiny_clip, images):
    """reward.name=hpsv2 with reward.options, through config validation and the trainer's build_reward."""
    from awm_fast.config import load_config
    from awm_fast.rewards import build_reward

    ckpt, arch, _ = tiny_hps
    opts = f"{{checkpoint: '{ckpt}', processor: '{tiny_clip}', model_config: '{arch}', device: cpu}}"
    cfg = load_config("pickscore_sd35m", ["model.path=/ckpt", "reward.name=hpsv2", f"reward.options={opts}"])
    out = build_reward(cfg.reward.name, **cfg.reward.options)(images, PROMPTS, [{}] * 3)
    direct = HPSv2Reward(checkpoint=ckpt, processor=tiny_clip, model_config=arch, device="cpu")(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(out["reward"], direct["reward"])
