"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): an MLP on the unit-norm CLIP-L/14 image embedding.

    e_i = E_img(x_i) / ||E_img(x_i)||,   score_i = MLP(e_i),
    MLP = Linear(768, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout Linear(64, 16) Linear(16, 1)

(dropout inactive at inference; the state-dict keys are "layers.{0,2,4,6,7}.{weight,bias}" as in the released
`sac+logos+ava1-l14-linearMSE.pth`). Scores are on the AVA 1-10 scale. The CLIP model defaults to
"openai/clip-vit-large-patch14"; the head weights are given by option `head`: a local .pth/.safetensors file, or
"REPO_ID:FILENAME" on the hub.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from awm_fast.rewards.base import check_batch, hub_kwargs
from awm_fast.rewards.clip_common import ClipBackbone

MODEL = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def _head_file(head: str | None) -> Path:
    hint = (f"the LAION aesthetic MLP weights ({HEAD_FILE}, github.com/christophschuhmann/improved-aesthetic-predictor): "
            "download them and pass head=PATH (or head=REPO_ID:FILENAME for a hub copy)")
    if not head:
        raise FileNotFoundError(f"reward 'aesthetic' needs {hint}")
    if Path(head).is_file():
        return Path(head)
    if ":" in head and not Path(head).exists():
        from huggingface_hub import hf_hub_download

        repo, filename = head.split(":", 1)
        try:
            return Path(hf_hub_download(repo, filename, **hub_kwargs(repo)))
        except Exception as exc:  # hub errors come in many classes (offline, 404, auth): all mean "not available"
            raise FileNotFoundError(f"reward 'aesthetic': cannot fetch {head!r} ({type(exc).__name__}); {hint}") from None
    raise FileNotFoundError(f"reward 'aesthetic': head file {head!r} does not exist; {hint}")


def load_head(head: str | None, dim: int) -> AestheticHead:
    path = _head_file(head)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    module = AestheticHead(dim)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"reward 'aesthetic': {path} is not an aesthetic MLP for {dim}-d embeddings "
                         f"({' '.join(str(exc).split())[:160]})") from None
    return module.eval().requires_grad_(False)


class AestheticReward:
    name = "aesthetic"

    def __init__(self, head: str | None = None, model: str = MODEL, processor: str | None = None, device=None,
                 dtype: str = "float32") -> None:
        _head_file(head)  # fail on missing weights before loading CLIP
        self.clip = ClipBackbone(reward=self.name, processor=processor or model, model=model, device=device, dtype=dtype)
        self.head = load_head(head, self.clip.model.config.projection_dim).to(self.clip.device)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_batch(self.name, images, prompts, metadata)
        return {"reward": self.head(self.clip.image_embeds(images)).float().cpu()}
