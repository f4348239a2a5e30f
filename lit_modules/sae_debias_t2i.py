"""The demo's biased text-to-image model: a small pixel-space diffusion UNet conditioned on a frozen text encoder.

Not part of SAE Debias itself: it stands in for Stable Diffusion (no text-to-image weights ship offline),
trained here on :class:`datamodules.sae_debias_images.BiasedCaptionsDataModule`, so that the SAE's
directions can be tested on images whose gender can be counted. DDPM training (epsilon prediction,
cosine schedule), classifier-free guidance by caption dropout, sampling with diffusers' own
``StableDiffusionPipeline`` (:mod:`core.pixel_pipeline`), so the debias hook runs the real code path.

    L = E_{x0, eps, t} || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c(caption)) ||^2   (DDPM Eq. 14)
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from core.bias_directions import DirectionBank
from core.debias_hook import DebiasHook, EncoderSite
from core.pixel_pipeline import encode_captions, generate, glyph_unet, pixel_pipeline, train_scheduler
from core.run_dir import run_directory
from lit_modules.sae_debias import load_text_encoder


class GlyphT2IModule(L.LightningModule):
    """Train the UNet on cached caption embeddings; at the end, save it and draw neutral-prompt samples.

    Args:
        text_encoder: alias or folder of the frozen text encoder (``minilm``).
        max_length: tokenizer padding length (the conditioning has this many tokens).
        channels: image channels (2: letter plane and gender-mark plane).
        size: image side in pixels.
        block_out_channels: UNet widths per level.
        lr: AdamW learning rate.
        cond_noise: Gaussian noise added to the caption embeddings in training, as a fraction of each
            token's RMS: the model sees only ~100 distinct captions, and without it any edited embedding is
            off its training set (profession accuracy collapsed under every edit); Stable Diffusion, trained
            on millions of captions, is smooth in its conditioning the way this makes the stand-in.
        num_train_timesteps: DDPM timesteps.
        sample_steps: DDIM steps when sampling.
        guidance: classifier-free guidance scale when sampling.
        bank: optional direction bank (from the SAE stage) to draw debiased samples beside the originals.
        layer: text-encoder layer the bank's hook edits (the SAE's layer).
        strength: lambda of the debiased samples.
        samples_per_profession: images per profession in the picture.
    """

    def __init__(self, text_encoder: str = "minilm", max_length: int = 16, channels: int = 2, size: int = 16,
                 block_out_channels: tuple[int, ...] = (16, 32), lr: float = 1e-3, cond_noise: float = 0.2,
                 num_train_timesteps: int = 1000,
                 sample_steps: int = 10, guidance: float = 5.0, bank: str = "", layer: int = 4, strength: float = 1.0,
                 samples_per_profession: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        encoder, self.tokenizer = load_text_encoder(text_encoder)
        self.tokenizer.model_max_length = max_length
        self.unet = glyph_unet(channels, size, int(encoder.config.hidden_size), block_out_channels)
        self.scheduler = train_scheduler(num_train_timesteps)
        self.pipe = pixel_pipeline(self.unet, encoder, self.tokenizer, self.scheduler)
        self.encoder = encoder
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)

    def setup(self, stage: str) -> None:
        # The encoder is frozen: every caption is encoded once (the training captions are a small closed set).
        self.register_buffer("caption_embeds", encode_captions(self.pipe, self.trainer.datamodule.captions),
                             persistent=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (x0.shape[0],), device=x0.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = self.caption_embeds[batch["caption"]]
        rms = cond.pow(2).mean(-1, keepdim=True).sqrt()
        cond = cond + self.hparams.cond_noise * rms * torch.randn_like(cond)
        pred = self.unet(noisy, t, cond).sample
        loss = F.mse_loss(pred, noise)  # DDPM Eq. 14
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr)

    def sample(self, prompts: list[str], seeds: list[int], hook: DebiasHook | None = None,
               professions: list[str] | None = None) -> Tensor:
        """Images for ``prompts`` (seeded per image), through the debias ``hook`` when given."""
        hp = self.hparams
        if hook is None:
            return generate(self.pipe, prompts, seeds, hp.sample_steps, hp.guidance)
        with hook(prompts, professions):
            return generate(self.pipe, prompts, seeds, hp.sample_steps, hp.guidance)

    def debias_hook(self, bank: DirectionBank, strength: float, mode: str = "project") -> DebiasHook:
        return DebiasHook([EncoderSite(self.encoder, self.tokenizer, self.hparams.layer)], bank, strength, mode)

    def on_fit_end(self) -> None:
        from lit_modules.sae_debias_plots import plot_grid

        hp, dm = self.hparams, self.trainer.datamodule
        run_dir = run_directory(self.trainer)
        self.unet.save_pretrained(run_dir / "unet")
        self.cpu().eval()
        n = hp.samples_per_profession
        prompts = [f"a photo of a {p}" for p in dm.professions for _ in range(n)]
        seeds = list(range(n)) * len(dm.professions)
        grids = {"no intervention": self.sample(prompts, seeds)}
        if hp.bank:
            hook = self.debias_hook(DirectionBank.load(hp.bank), hp.strength)
            grids[f"SAE Debias (lambda {hp.strength:g})"] = self.sample(prompts, seeds, hook)
        shape = (len(dm.professions), n, hp.channels, hp.size, hp.size)
        plot_grid({k: v.reshape(shape).numpy() for k, v in grids.items()}, dm.professions, run_dir / "samples.png",
                  self.trainer.loggers)
