"""Per-dtype (atol, rtol) used by every kernel/op comparison against the float64 torch reference."""
import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


# Whole-model bf16 vs float32 (tests/models/test_bf16.py) on the tiny random-weight pipelines: relative norm
# ||bf16 - fp32|| / ||fp32|| of the velocity and of the trained weights' gradient, relative difference of the
# loss parts (loss, mse, KL terms). Measured (CPU, torch 2.13): SD3 LoRA velocity 0.0065, gradient 0.007, KL
# 0.001; SD3 full fine-tuning 0.006, 0.005, 0.006; FLUX LoRA 0.032, 0.17, 0.047 (the stock diffusers FLUX
# transformer alone, cast to bf16, is 0.026 off its float32 velocity on this model: most of FLUX's error is
# diffusers' own bf16 FLUX, and the backward amplifies it).
MODEL_BF16 = {
    "sd3": {"velocity": 0.02, "loss": 0.02, "grad": 0.03},
    "flux": {"velocity": 0.08, "loss": 0.12, "grad": 0.4},
}

# Merged LoRA (tests/models/test_merged_lora.py): the no-grad calls on weight copies W + s B A rounded once to the
# model dtype, against the unmerged calls; relative velocity norm. Measured (CPU, torch 2.13, tiny SD3 / FLUX,
# adapters moving the velocity by 0.11 / 0.08): float32 1.3e-7 / 1.2e-7, bfloat16 0.0036 / 0.0028.
MERGED_LORA = {torch.float32: 1e-5, torch.bfloat16: 0.01}

# FP8 base weights (tests/models/test_fp8.py, model.fp8=true, CPU emulation): float8 e4m3 with per-row dynamic
# activation scales against the same policy in bf16 on the tiny pipelines (relative norms as MODEL_BF16), and one
# float8 linear against its exact float32 product (FP8_LINEAR; e4m3 keeps 3 mantissa bits). Measured (CPU, torch
# 2.13): linear 0.025; SD3 velocity 0.019, loss parts <= 0.0064, LoRA gradient 0.026; FLUX 0.015, 0.003, 0.027
# (the LoRA moves the velocity by 0.5 on these adapters).
FP8_LINEAR = 0.05
MODEL_FP8 = {
    "sd3": {"velocity": 0.05, "loss": 0.02, "grad": 0.06},
    "flux": {"velocity": 0.05, "loss": 0.02, "grad": 0.06},
}
