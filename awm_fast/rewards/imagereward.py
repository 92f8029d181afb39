"""ImageReward (Xu et al. 2023): BLIP (ViT-L/16 image encoder + BERT text encoder cross-attending to the image)
with an MLP head, trained on 137k expert comparisons.

    h_i = BERT(tokens(p_i), cross-attention to ViT(x_i))[CLS],   score_i = (MLP(h_i) - 0.16717362830052426) / 1.0333394966054072

as the official `ImageReward.score` (tokens: padded / truncated to 35, the [CLS] position read; the MLP is the
LAION aesthetic layout, Linear 768-1024-128-64-16-1 without activations: `aesthetic.AestheticHead`). Scores are
roughly standard-normal over the training images (good SD images around 0 to 1.5).

Loading follows the official `ImageReward.load("ImageReward-v1.0")`: "ImageReward.pt" and "med_config.json" from
the hub repo "THUDM/ImageReward" (option `model`: that id or a local folder with both files), the BERT tokenizer
"bert-base-uncased" plus BLIP's [DEC] / [ENC] tokens (option `tokenizer`). The file loads with weights_only=True and
its keys map onto transformers' BLIP towers:
    blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj} -> vision.embeddings.{class_embedding,
        position_embedding, patch_embedding},  blocks.k.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2} ->
        encoder.layers.k.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1/fc2},  norm -> post_layernorm
    blip.text_encoder.* -> BlipTextModel (the same BERT names),  mlp.* -> the head
(the unused blip.vision_proj / text_proj are dropped). The ViT's size is read from the checkpoint (BLIP's ViTs have
64-wide heads, LayerNorm eps 1e-6, GELU); images: shortest side to its input size bicubic, centre crop, OpenAI CLIP
mean/std (the official transform).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from awm_fast.env import DTYPES, pick_device
from awm_fast.rewards.aesthetic import AestheticHead
from awm_fast.rewards.base import check_batch, load_pretrained, to_pil
from awm_fast.rewards.checkpoints import load_exact, load_state_dict, resolve_file

MODEL = "THUDM/ImageReward"
TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
HEAD_WIDTH = 64  # BLIP ViT-B: 768 / 12 heads, ViT-L: 1024 / 16
_VIT = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
DROPPED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict]:
    """(vision, text, head, unknown) state dicts under the transformers / AestheticHead names (module docstring)."""
    vision, text, head, unknown = {}, {}, {}, {}
    for key, value in state.items():
        if key.startswith(DROPPED):
            continue
        if key.startswith("blip.visual_encoder."):
            k = key.removeprefix("blip.visual_encoder.")
            block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
            if k in _VIT_TOP:
                vision[_VIT_TOP[k]] = value
            elif block and block.group(2) in _VIT:
                vision[f"encoder.layers.{block.group(1)}.{_VIT[block.group(2)]}.{block.group(3)}"] = value
            else:
                unknown[key] = value
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            unknown[key] = value
    return vision, text, head, unknown


def vision_config(vision: dict[str, torch.Tensor]):
    """BlipVisionConfig of the checkpoint's ViT: width, patch, input size, depth and MLP width from its shapes."""
    from transformers import BlipVisionConfig

    try:
        width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
        grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
        mlp = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"reward 'imagereward': the checkpoint has no {exc} (not an ImageReward/BLIP file)") from None
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                            num_attention_heads=width // HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med_config: Path, encoder_width: int):
    """BlipTextConfig of ImageReward's med_config.json (a BertConfig), cross-attending to `encoder_width` features."""
    from transformers import BlipTextConfig

    try:
        med = json.loads(med_config.read_text())
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
        return BlipTextConfig(**{k: med[k] for k in keys if k in med}, encoder_hidden_size=encoder_width,
                              is_decoder=True)  # is_decoder builds the cross-attention layers; forward runs bidirectional
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"reward 'imagereward': {med_config} is not a BERT config JSON ({exc})") from None


def blip_tokenizer(source: str):
    """BertTokenizer plus BLIP's special tokens (bos [DEC], additional [ENC]), as BLIP's init_tokenizer."""
    from transformers import BertTokenizer

    tok = load_pretrained(BertTokenizer, source, reward="imagereward", what="BERT tokenizer", option="tokenizer")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageRewardReward:
    name = "imagereward"

    def __init__(self, model: str = MODEL, tokenizer: str = TOKENIZER, device=None, dtype: str = "float32") -> None:
        from transformers import BlipTextModel, BlipVisionModel, CLIPImageProcessor

        if dtype not in DTYPES:
            raise ValueError(f"reward 'imagereward': dtype={dtype!r} is not one of {tuple(DTYPES)}")
        folder = Path(model).expanduser()
        if not folder.is_dir() and (model.startswith(("/", ".", "~")) or model.count("/") != 1):
            raise FileNotFoundError(f"reward 'imagereward': model={model!r} is neither a folder with ImageReward.pt and "
                                    f"med_config.json nor a hub id like {MODEL!r}")
        files = [str(folder / f) if folder.is_dir() else f"{model}:{f}" for f in ("ImageReward.pt", "med_config.json")]
        ckpt = resolve_file(files[0], reward=self.name, what="ImageReward checkpoint", option="model")
        med = resolve_file(files[1], reward=self.name, what="ImageReward med_config.json", option="model")
        self.device, self.dtype = pick_device(device, "reward 'imagereward' device"), DTYPES[dtype]
        self.tokenizer = blip_tokenizer(tokenizer)
        vision, text, head, unknown = split_checkpoint(load_state_dict(ckpt, reward=self.name))
        if unknown:
            raise ValueError(f"reward 'imagereward': {ckpt} has keys this model does not know: {sorted(unknown)[:4]}")
        vcfg = vision_config(vision)
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(text_config(med, vcfg.hidden_size), add_pooling_layer=False)
        self.head = AestheticHead(self.text.config.hidden_size)
        for module, part in ((self.vision, vision), (self.text, text), (self.head, head)):
            load_exact(module, part, reward=self.name, source=ckpt)
            module.eval().requires_grad_(False).to(self.device, self.dtype if module is not self.head else None)
        size = vcfg.image_size
        self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    @torch.no_grad()
    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts).last_hidden_state
        return {"reward": ((self.head(hidden[:, 0].float()) - MEAN) / STD).cpu()}
