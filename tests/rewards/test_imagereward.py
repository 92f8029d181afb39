"""ImageReward on tiny random weights saved in the released ImageReward.pt layout (BLIP's timm-style ViT keys,
BLIP's BERT, the MLP head) with a med_config.json and a BERT tokenizer folder, against a reference ViT written
here in that layout. Nothing is downloaded."""
import json

import pytest
import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, CLIPImageProcessor

from awm_fast.rewards import load_reward
from awm_fast.rewards.base import to_pil
from awm_fast.rewards.imagereward import MEAN, STD, ImageRewardReward, blip_tokenizer

PROMPTS = ["a red cat", "a photo of a dog", "blue sky"]
WORDS = ["a", "red", "cat", "dog", "photo", "of", "blue", "sky"]


class VitBlock(nn.Module):
    """BLIP's ViT block layout: norm1, attn.qkv (fused), attn.proj, norm2, mlp.fc1 / fc2 (LayerNorm eps 1e-6)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class ReferenceVit(nn.Module):
    def __init__(self, width: int = 128, depth: int = 2, image: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(VitBlock(width, width // 64) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """(model folder with ImageReward.pt + med_config.json, tokenizer folder, reference parts)."""
    root = tmp_path_factory.mktemp("tiny_imagereward")
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(str(root / "tok" / "vocab.txt")).save_pretrained(root / "tok")
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "pad_token_id": 0, "vocab_size": len(blip_tokenizer(str(root / "tok"))), "encoder_width": 32,
           "add_cross_attention": True, "model_type": "bert", "type_vocab_size": 2}
    (root / "model").mkdir()
    (root / "model" / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    vit = ReferenceVit().eval()
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                        encoder_hidden_size=128, is_decoder=True), add_pooling_layer=False).eval()
    mlp = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
                        nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
    for p in list(vit.parameters()) + list(text.parameters()):
        if p.ndim == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()}
    state |= {"blip.text_encoder.embeddings.position_ids": torch.arange(64)[None],  # persistent in BLIP's BERT
              "blip.vision_proj.weight": torch.randn(8, 128), "blip.text_proj.weight": torch.randn(8, 32)}
    torch.save(state, root / "model" / "ImageReward.pt")
    return str(root / "model"), str(root / "tok"), (vit, text, mlp)


@pytest.fixture
def images():
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def reference(parts, tokenizer, images, prompts):
    vit, text, mlp = parts
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=to_pil(images), return_tensors="pt")["pixel_values"]
    tok = blip_tokenizer(tokenizer)(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        embeds = vit(pixels)
        h = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=embeds,
                 encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        return ((mlp(h) - MEAN) / STD).squeeze(-1)


def test_imagereward_matches_reference(tiny_imagereward, images):
    model, tok, parts = tiny_imagereward
    out = ImageRewardReward(model=model, tokenizer=tok, device="cpu")(images, PROMPTS, [{}] * 3)
    assert out["reward"].shape == (3,) and len(set(out["reward"].tolist())) == 3
    torch.testing.assert_close(out["reward"], reference(parts, tok, images, PROMPTS), atol=1e-5, rtol=1e-5)
    assert blip_tokenizer(tok)("a cat", padding="max_length", max_length=35)["input_ids"][0] == 2  # [CLS] read


def test_imagereward_through_registry_and_combination(tiny_imagereward, images):
    model, tok, _ = tiny_imagereward
    alone = load_reward("imagereward", model=model, tokenizer=tok, device="cpu")(images, PROMPTS, [{}] * 3)["reward"]
    both = load_reward("imagereward+jpeg_incompressibility", weights=[1.0, -0.25],
                       imagereward=dict(model=model, tokenizer=tok, device="cpu"))(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(both["imagereward"], alone)
    torch.testing.assert_close(both["reward"], alone - 0.25 * both["jpeg_incompressibility"])


def test_imagereward_refuses_foreign_files(tiny_imagereward, tmp_path):
    model, tok, _ = tiny_imagereward
    state = torch.load(f"{model}/ImageReward.pt", weights_only=True)
    state["blip.itm_head.weight"] = torch.randn(2, 32)
    (tmp_path / "med_config.json").write_text(open(f"{model}/med_config.json").read())
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="itm_head"):
        ImageRewardReward(model=str(tmp_path), tokenizer=tok, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        ImageRewardReward(model=str(tmp_path / "absent"), tokenizer=tok, device="cpu")


def test_imagereward_from_a_config(tiny_imagereward, images):
    """reward.name=imagereward in a combination with per-component options, through config validation and build_reward."""
    from awm_fast.config import load_config
    from awm_fast.rewards import build_reward

    model, tok, parts = tiny_imagereward
    opts = f"{{imagereward: {{model: '{model}', tokenizer: '{tok}', device: cpu}}}}"
    cfg = load_config("pickscore_sd35m", ["model.path=/ckpt", "reward.name=imagereward+jpeg_compressibility",
                                          "reward.weights=[1.0,0.0]", f"reward.options={opts}"])
    out = build_reward(cfg.reward.name, weights=cfg.reward.weights, **cfg.reward.options)(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(out["reward"], reference(parts, tok, images, PROMPTS), atol=1e-5, rtol=1e-5)
