"""Loading a pipeline through models.pipeline.from_pretrained raises no deprecation warning of our own making
(diffusers renamed torch_dtype; the call must stay quiet on every supported version)."""
import warnings

import torch

from awm_fast.families.tiny import build_tiny_sd3
from awm_fast.models.pipeline import from_pretrained


def test_from_pretrained_is_quiet_and_keeps_the_dtype(tmp_path):
    from diffusers import DiffusionPipeline

    path = build_tiny_sd3(tmp_path / "sd3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = from_pretrained(DiffusionPipeline, "sd3", str(path), torch.bfloat16)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer.dtype == torch.bfloat16
