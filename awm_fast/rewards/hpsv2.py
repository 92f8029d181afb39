"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): OpenCLIP ViT-H/14 fine-tuned on HPD v2 preferences.

    score_i = cos(E_img(x_i), E_txt(p_i))

as the official `hpsv2.score`: the diagonal of image_features @ text_features.T with both unit-norm (no logit
scale); HPSv2.1 scores sit around 0.25-0.35 for good images.

Loading follows the official package: open_clip `create_model_and_transforms("ViT-H-14", ...)` then
`model.load_state_dict(torch.load(cp)["state_dict"])` with cp = "HPS_v2.1_compressed.pt" from the hub repo
"xswu/HPSv2". Here the file loads with weights_only=True and its open_clip keys are mapped onto transformers'
CLIPModel (open_clip_torch needs torchvision, which pins another torch than the project's):
    visual.conv1 -> patch_embedding, visual.ln_pre -> pre_layrnorm, visual.ln_post -> post_layernorm,
    attn.in_proj_{weight,bias} = [q; k; v] -> q_proj, k_proj, v_proj,  ln_1/ln_2 -> layer_norm1/2,
    mlp.c_fc/c_proj -> mlp.fc1/fc2,  visual.proj (W, P) -> visual_projection.weight = proj^T,
    text_projection (W, P) -> text_projection.weight = text_projection^T, ln_final -> final_layer_norm.
The architecture is open_clip's ViT-H-14 config (`VIT_H_14`, GELU, LayerNorm eps 1e-5); option `model_config`
takes another open_clip model-config JSON (the same keys). Text goes through the CLIP tokenizer of
"laion/CLIP-ViT-H-14-laion2B-s32B-b79K" (open_clip's ViT-H-14 tokenizer: the same BPE, 77 tokens; the text
feature is read at the first end-of-text token, open_clip's argmax(token id)), images through its image processor
(shortest side to 224 bicubic, centre crop, OpenAI CLIP mean/std, as open_clip's val transform).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from awm_fast.env import DTYPES, pick_device
from awm_fast.rewards.base import check_batch, load_pretrained, to_pil
from awm_fast.rewards.checkpoints import load_exact, load_state_dict, resolve_file
from awm_fast.rewards.clip_common import _features, normalize

PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CHECKPOINT = "xswu/HPSv2:HPS_v2.1_compressed.pt"
VIT_H_14 = {  # open_clip/model_configs/ViT-H-14.json
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale"}
_NORMS = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "ln_final": "text_model.final_layer_norm"}


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict under transformers CLIPModel names (module docstring); keys with no home are
    kept as they are, so that `load_exact` names them."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn_mask"):  # the text tower's causal mask, a buffer in older open_clip files
            continue
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key.rsplit(".", 1)[0] in _NORMS:
            out[f"{_NORMS[key.rsplit('.', 1)[0]]}.{key.rsplit('.', 1)[1]}"] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif re.fullmatch(r"(visual\.)?transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias)", key):
            tower = "vision_model" if key.startswith("visual.") else "text_model"
            layer, kind = key.split(".")[-3], key.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{tower}.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        elif block and block.group(3) in _BLOCK:
            tower = "vision_model" if block.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{block.group(2)}.{_BLOCK[block.group(3)]}.{block.group(4)}"] = value
        else:
            out[key] = value
    return out


def clip_config(arch: dict, state: dict[str, torch.Tensor], tokenizer):
    """transformers CLIPConfig of an open_clip model config (MLP widths read from the checkpoint's shapes)."""
    from transformers import CLIPConfig

    try:
        v, t = arch["vision_cfg"], arch["text_cfg"]
        text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], num_hidden_layers=t["layers"],
                    num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                    intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                    hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        vision = dict(hidden_size=v["width"], num_hidden_layers=v["layers"], image_size=v["image_size"],
                      num_attention_heads=v["width"] // v.get("head_width", 64), patch_size=v["patch_size"],
                      intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                      hidden_act="gelu", layer_norm_eps=1e-5)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"reward 'hpsv2': the model config or checkpoint lacks {exc} (an open_clip CLIP "
                         "config has embed_dim, vision_cfg and text_cfg)") from None


class HPSv2Reward:
    name = "hpsv2"

    def __init__(self, checkpoint: str = CHECKPOINT, processor: str = PROCESSOR, model_config: str | None = None,
                 device=None, dtype: str = "float32") -> None:
        from transformers import AutoProcessor, CLIPModel

        if dtype not in DTYPES:
            raise ValueError(f"reward 'hpsv2': dtype={dtype!r} is not one of {tuple(DTYPES)}")
        path = resolve_file(checkpoint, reward=self.name, what="HPSv2.1 checkpoint", option="checkpoint")
        arch = VIT_H_14
        if model_config is not None:
            try:
                arch = json.loads(Path(model_config).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"reward 'hpsv2': model_config={model_config!r} is not a readable open_clip model "
                                 f"config JSON ({exc})") from None
        self.device, self.dtype = pick_device(device, "reward 'hpsv2' device"), DTYPES[dtype]
        self.processor = load_pretrained(AutoProcessor, processor, reward=self.name, what="CLIP processor",
                                         option="processor")
        state = load_state_dict(path, reward=self.name)
        model = CLIPModel(clip_config(arch, state, self.processor.tokenizer))
        load_exact(model, open_clip_to_hf(state), reward=self.name, source=path)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.context_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = self.processor(text=list(prompts), padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")
        img = normalize(_features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))))
        txt = normalize(_features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device))))
        return {"reward": (img * txt).sum(-1).cpu()}
