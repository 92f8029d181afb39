"""models.pipeline.VaeDecoder: the decode in batches, and `speed_up` (model.vae_compile on CUDA: channels_last
weights and latents, the decoder compiled) giving the same images; here on the CPU with the aot_eager backend."""
import torch
from diffusers import AutoencoderKL

from awm_fast.models.pipeline import make_decoder
from tests.tolerances import tol


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)  # the tiny pipelines' VAE (awm_fast.families.tiny)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5305).eval()


def test_sped_up_decoder_gives_the_same_images():
    latents = torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    decode = make_decoder(_vae(), batch=2)  # 3 batches: 2 + 2 + 1
    eager = decode(latents)
    assert eager.shape == (5, 3, 16, 16) and eager.min() >= 0 and eager.max() <= 1
    decode.speed_up(backend="aot_eager")
    conv = decode.vae.decoder.conv_in.weight
    assert decode.fast and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(decode(latents), eager, **tol(torch.float32))
