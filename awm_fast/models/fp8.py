"""FP8 frozen base projections (model.fp8): the transformer blocks' frozen nn.Linear weights stored in float8
(e4m3) with one scale each, every product with them a float8 GEMM with dynamic per-row scaling.

    W8 = fp8(W / s_W),          s_W    = max |W| / 448                (once, at load: the frozen weight)
    x8 = fp8(x / s_x),          s_x[m] = max_k |x[m, k]| / 448        (every call, per row: a row's output
                                                                       never depends on the other rows)
    y[m, n] = s_x[m] s_W  sum_k x8[m, k] W8[n, k]  + b[n]             (out in the autocast dtype, bf16)
  backward (input gradient only: the weight is frozen, so no weight-gradient GEMM and no saved input):
    g8 = fp8(g / s_g),          s_g[m] = max_n |g[m, n]| / 448
    dx[m, k] = s_g[m] s_W  sum_n g8[m, n] W8[n, k]

The policy, reference and EMA calls all go through the same W8, so with equal adapters their outputs are
equal bit for bit (the per-row scale makes a row's result independent of its batch). LoRA weights, their
products and the loss stay in float32 / bf16 (models.routing adds the LoRA product to y).

Why not torchao: its Float8Linear (torchao.float8, 0.18) keeps the weight in high precision, re-casts it every
call and always computes grad_weight (a third of the backward, wasted on a frozen weight); its inference
configs (quantize_) have no input-gradient backward. So this is a small `torch._scaled_mm` autograd Function.
On CUDA: `torch._scaled_mm` with row-wise scales (sm_90+), or tensor-wise with the row scales applied to a
float32 product (sm_89). On the CPU: emulation, the float8 values upcast to float32 for the product (the same
quantisation, a float32 GEMM). GPUs below sm_89 (no float8 tensor cores) are refused.
"""
from __future__ import annotations

import logging

import torch

from awm_fast.models.compile import transformer_blocks

logger = logging.getLogger(__name__)

E4M3 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # an all-zero row or weight: scale 1e-12, its float8 values 0
ALIGN = 16  # torch._scaled_mm needs both dimensions of the weight to be multiples of 16
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89), Hopper (sm_90), Blackwell (sm_100, sm_120)


def check_fp8(device: torch.device) -> None:
    """Raise ValueError (one line) where model.fp8 cannot run (config.validate checked the dtype and LoRA)."""
    if E4M3 is None:
        raise ValueError(f"model.fp8=true needs torch.float8_e4m3fn (torch {torch.__version__} has none)")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise ValueError(f"model.fp8=true needs a GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); "
                             f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}")
    elif device.type != "cpu":
        raise ValueError(f"model.fp8=true runs on CUDA (sm_89+) or, emulated, on the CPU; not on {device.type}")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, s) with x8 = fp8(x / s), s[m] = max_k |x[m, k]| / 448 of shape (M, 1), float32; x is (M, K)."""
    scale = (x.detach().abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).contiguous(), scale  # row-major for _scaled_mm


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8, s_W) with W8 = fp8(W / s_W), s_W = max |W| / 448 (a 0-dim float32 tensor)."""
    scale = (w.detach().abs().max().float() / FP8_MAX).clamp_min(MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale


def scaled_mm(a8: torch.Tensor, a_scale: torch.Tensor, b8: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """out[m, n] = a_scale[m] b_scale sum_k a8[m, k] b8[k, n]: a8 (M, K) row-major, b8 (K, N) column-major
    (a transposed row-major tensor), a_scale (M, 1), b_scale 0-dim."""
    if a8.device.type != "cuda":  # emulation: the float8 values upcast, one float32 GEMM (not autocast to bf16)
        with torch.autocast(a8.device.type, enabled=False):
            return ((a8.float() @ b8.float()) * (a_scale * b_scale)).to(out_dtype)
    if torch.cuda.get_device_capability(a8.device) >= (9, 0) and out_dtype == torch.bfloat16:
        b_scales = b_scale.reshape(1, 1).expand(1, b8.shape[1]).contiguous()
        return torch._scaled_mm(a8, b8, scale_a=a_scale, scale_b=b_scales, out_dtype=out_dtype)
    one = torch.ones((), device=a8.device, dtype=torch.float32)
    out = torch._scaled_mm(a8, b8, scale_a=one, scale_b=b_scale.reshape(()), out_dtype=torch.float32)
    return (out * a_scale).to(out_dtype)


class Float8Matmul(torch.autograd.Function):
    """y = x W^T with x (M, K) quantised per row and W8 (N, K) frozen (module docstring); backward: dx only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype):
        ctx.save_for_backward(w8, w_scale)
        ctx.x_dtype = x.dtype
        x8, x_scale = quantize_rows(x)
        return scaled_mm(x8, x_scale, w8.t(), w_scale, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w8, w_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g8, g_scale = quantize_rows(grad.contiguous())
        dx = scaled_mm(g8, g_scale, w8.t().contiguous().t(), w_scale, grad.dtype)  # W8 (N, K) column-major
        return dx.to(ctx.x_dtype), None, None, None


def float8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W^T + b through `Float8Matmul`, written in the autocast dtype (else x's dtype)."""
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    y = Float8Matmul.apply(x.reshape(-1, x.shape[-1]), w8, w_scale, out_dtype).reshape(*x.shape[:-1], w8.shape[0])
    return y if bias is None else y + bias.to(out_dtype)


class Float8Linear(torch.nn.Module):
    """A frozen nn.Linear with its weight as the float8 buffer `weight` and the float32 0-dim buffer
    `weight_scale` (buffers: no optimizer, DDP or checkpoint ever sees them as parameters); the bias, if any,
    stays a frozen parameter in its dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = quantize_weight(linear.weight.detach())
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight)

    def forward_with(self, x: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
        """The product with another float8 weight in this layer's scale (models.merged_lora)."""
        if w8.dtype != E4M3:
            raise TypeError(f"Float8Linear weight is {w8.dtype}, not float8_e4m3fn (cast by a later .to(dtype)?)")
        return float8_linear(x, w8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def convert_to_fp8(transformer: torch.nn.Module) -> int:
    """Replace every frozen plain nn.Linear inside the transformer blocks (models.compile.transformer_blocks; the
    LoRA layers' base layers included) whose dimensions are multiples of 16 by a `Float8Linear`; returns how
    many. The LoRA A / B of both adapters (the frozen "ema" one included), trainable linears and, outside the
    blocks, the embedders and the output projection stay as they are."""
    count = 0
    for block in transformer_blocks(transformer):
        for path, parent in list(block.named_modules()):
            if "lora_" in path:  # peft's lora_A / lora_B dicts: the adapters (the frozen "ema" one too) stay
                continue
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and not child.weight.requires_grad \
                        and child.in_features % ALIGN == 0 and child.out_features % ALIGN == 0:
                    setattr(parent, name, Float8Linear(child))
                    count += 1
    if count == 0:
        raise ValueError("model.fp8=true found no nn.Linear with dimensions divisible by 16 in the transformer blocks")
    return count
