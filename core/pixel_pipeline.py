"""A pixel-space ``StableDiffusionPipeline`` around a small UNet, for the CPU demo of text-conditioned debiasing.

The UNet denoises the image itself: the pipeline's VAE is a one-level placeholder (scale factor 1) that
is never run, because images are taken with ``output_type="latent"``. Everything else (prompt encoding,
classifier-free guidance, the DDIM loop) is diffusers' own code, so hooks on the text encoder are
exercised exactly as on Stable Diffusion. Any Hugging Face text encoder works: BERT-style encoders are
called with their attention mask (``config.use_attention_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def glyph_unet(channels: int = 2, size: int = 16, cross_attention_dim: int = 384,
               block_out_channels: Sequence[int] = (32, 64)) -> nn.Module:
    """A small ``UNet2DConditionModel``: one plain and (n-1) cross-attention levels, plus the text conditioning
    attention-pooled into the timestep embedding (``addition_embed_type="text"``), so that the prompt reaches
    every residual block: with a few hundred CPU steps, cross-attention alone learned too little of it."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=tuple(block_out_channels),
        layers_per_block=1, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, addition_embed_type="text",
        addition_embed_type_num_heads=max(1, cross_attention_dim // 64))


def train_scheduler(num_train_timesteps: int = 1000) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def pixel_pipeline(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any) -> Any:
    """``StableDiffusionPipeline`` sampling with DDIM (from ``scheduler``'s config) directly in pixel space."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    channels = unet.config.in_channels
    placeholder = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=channels,
                                block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, layers_per_block=1)
    text_encoder.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(vae=placeholder, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(pipe: Any, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """(N, T, d) conditioning of ``captions`` through the pipeline's own prompt encoding."""
    device = next(pipe.text_encoder.parameters()).device
    return torch.cat([pipe.encode_prompt(list(captions[i:i + batch_size]), device, 1, False)[0]
                      for i in range(0, len(captions), batch_size)])


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = 10, guidance: float = 3.0,
             batch_size: int = 128) -> Tensor:
    """(N, C, H, W) images in [0, 1], image i from its own generator seeded ``seeds[i]`` (same noise per seed)."""
    size = pipe.unet.config.sample_size
    out = []
    for i in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        latents = pipe(list(prompts[i:i + batch_size]), height=size, width=size, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generators, output_type="latent").images
        out.append(latents)
    return (torch.cat(out).clamp(-1, 1) + 1) / 2
