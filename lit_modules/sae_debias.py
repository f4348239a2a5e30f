"""SAE Debias: a k-sparse autoencoder on a text encoder's residual stream finds per-profession gender
directions, which are suppressed at inference in any text-to-image pipeline using that encoder.

Paper: C. Wu, Z. Wang, K. Xie, N. K. Devulapally, V. S. Lokhande, M. Gao, "Model-Agnostic Gender Bias
Control for Text-to-Image Generation via Sparse Autoencoder", arXiv 2507.20973 (no official code found;
the SAE and the steering mechanics follow Concept Steerers, kim-dahye/steerers, see the method notes).

Idea: a TopK SAE is trained once on token-level residual features of the (frozen) text encoder at one
layer, over a corpus of explicitly gendered profession prompts. For each profession the male-minus-female
mean of the sparse codes, decoded by the dictionary, is a direction in residual space; at generation the
component of every token of a conditional prompt along its profession's direction is removed at the
same layer (a forward hook; the UNet is never touched, nothing is retrained).

Equations (numbered here; the paper's could not be read):
- (1) z = TopK(ReLU((h - b_dec) W_enc + b_enc)),  h_hat = z W_dec + b_dec   -> ``core.topk_sae.TopKSAE``
- (2) L = FVU(h_hat, h) + auxk_coef * NMSE(AuxK)                              -> ``training_step``
- (3) delta_p = E[z | male, p] - E[z | female, p]; u_p = unit(delta_p W_dec)  -> ``build_banks`` (D1-D4)
- (4) h_t <- h_t - lambda <h_t - c, u_p> u_p                                 -> ``core.debias_hook`` (S1)
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from core.bias_directions import (
    DirectionBank,
    bank_from_deltas,
    class_mean_difference,
    keep_top_latents,
    random_latent_bank,
)
from core.debias_hook import DebiasHook, EncoderSite
from core.gender_probe import GenderProbe, bias_of, conditioning
from core.packaged_models import resolve_model
from core.run_dir import run_directory
from core.text_layers import layer_features, layer_module, pool_tokens
from core.topk_sae import TopKSAE


def load_text_encoder(name: str, subfolder: str = "", tokenizer_subfolder: str = "",
                      key: str = "model.init_args.text_encoder") -> tuple[Any, Any]:
    """(frozen encoder in eval mode, tokenizer) from a local folder, an alias or a cached hub id."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(name)
    try:
        encoder = AutoModel.from_pretrained(path, subfolder=subfolder)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tokenizer_subfolder or subfolder)
    except OSError as err:
        raise FileNotFoundError(f"{key}={name!r}: no local weights ({err.__class__.__name__}); download the model "
                                "once with network access, or point the key at a local folder") from err
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


class SAEDebiasModule(L.LightningModule):
    """Train the TopK SAE on a frozen text encoder's layer, then build and save the direction banks.

    Args:
        text_encoder: alias, local folder or cached hub id (``minilm``; a Stable Diffusion folder).
        subfolder: the encoder's subfolder (``text_encoder`` in a diffusers pipeline folder).
        tokenizer_subfolder: the tokenizer's subfolder (default: ``subfolder``; ``tokenizer`` for diffusers).
        layer: 0-based encoder layer whose output the SAE reads and the hook edits.
        max_length: tokenizer padding length (must match the pipeline's ``tokenizer.model_max_length``).
        expansion: d_sae / d_in.
        k: latents kept per token.
        auxk: dead latents used by the AuxK loss.
        auxk_coef: AuxK loss weight.
        dead_tokens: tokens without firing after which a latent counts as dead.
        lr: Adam learning rate (constant, eps 6.25e-10 as openai/Concept Steerers).
        init_tokens: tokens sampled for the geometric-median pre-bias and the variance scale.
        target_offset: Concept Steerers' released loss target ``h - b_dec`` instead of ``h``.
        code: ``topk`` codes or ``dense`` ReLU codes (Concept Steerers' steering encoding) for directions.
        pooling: token pooling of codes for the direction estimate: ``mean`` (real tokens), ``all``, ``first``.
        direction_source: ``decoder`` (delta W_dec) or ``encoder`` (delta W_enc^T) directions.
        latents: keep only this many latents of largest |delta_p| (0: all).
        fallback: ``global`` (mean direction for professions outside the bank) or ``none`` (an error).
        origin: projection origin c: ``mean`` of the corpus features, ``zero`` or ``b_dec``.
        random_latents: dictionary rows per direction of the random-latent control bank.
        strength: lambda for the probe (and the images) measured at the end of fit.
        mode: ``project`` or ``subtract`` for that measurement.
        pipeline: diffusers text-to-image folder / cached hub id whose images are evaluated at the end of fit
            (``""``: no image evaluation); its text encoder(s) must be the one(s) the SAE read.
        clip_model: local CLIP folder of the image judge (zero-shot gender, CLIP score); needed with ``pipeline``.
        pipeline_layers: edited layer per pipeline text encoder (``[]``: ``[layer]``; SDXL: ``[10, 28]``).
        pipeline_banks: per pipeline text encoder, ``""`` (this run's banks), ``none`` (unedited) or the
            ``banks/`` folder of the run whose SAE read that encoder (``[]``: this run's banks on the first).
        eval_images: images per profession and row.
        eval_steps: denoising steps.
        guidance: classifier-free guidance scale.
    """

    def __init__(self, text_encoder: str = "minilm", subfolder: str = "", tokenizer_subfolder: str = "",
                 layer: int = 4, max_length: int = 16, expansion: int = 4, k: int = 32, auxk: int = 256,
                 auxk_coef: float = 1 / 32, dead_tokens: int = 100_000, lr: float = 4e-4, init_tokens: int = 32768,
                 target_offset: bool = False, code: Literal["topk", "dense"] = "topk",
                 pooling: Literal["mean", "all", "first"] = "mean",
                 direction_source: Literal["decoder", "encoder"] = "decoder", latents: int = 0,
                 fallback: Literal["global", "none"] = "global", origin: Literal["mean", "zero", "b_dec"] = "mean",
                 random_latents: int = 16, strength: float = 1.0, mode: Literal["project", "subtract"] = "project",
                 pipeline: str = "", clip_model: str = "", pipeline_layers: list[int] | None = None,
                 pipeline_banks: list[str] | None = None, eval_images: int = 8, eval_steps: int = 50,
                 guidance: float = 7.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder, self.tokenizer = load_text_encoder(text_encoder, subfolder, tokenizer_subfolder)
        self.tokenizer.model_max_length = max_length
        layer_module(self.encoder, layer)
        width = int(self.encoder.config.hidden_size)
        self.sae = TopKSAE(width, expansion, k, auxk, auxk_coef, dead_tokens,
                           hook_name=f"layer.{layer}", model_name=text_encoder)
        self.banks: dict[str, DirectionBank] = {}

    def features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B*T, d) token features and (B*T,) real-token weights of a batch."""
        h = layer_features(self.encoder, batch["input_ids"], batch["attention_mask"], self.hparams.layer)
        return h.flatten(0, 1), batch["attention_mask"].flatten().float()

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is not None:
            return  # resumed: the checkpoint's weights were restored just before this hook; keep them
        tokens = []
        for batch in self.trainer.datamodule.train_dataloader():
            h, w = self.features({k: v.to(self.device) for k, v in batch.items()})
            tokens.append(h[w > 0])
            if sum(len(t) for t in tokens) >= self.hparams.init_tokens:
                break
        self.sae.initialize(torch.cat(tokens)[: self.hparams.init_tokens])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        h, w = self.features(batch)
        out = self.sae.loss(h, w, self.hparams.target_offset)  # Eq. (2)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True)
        return out["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        h, w = self.features(batch)
        err = (self.sae(h) - h).pow(2).sum(-1)
        var = (h - (h * w[:, None]).sum(0) / w.sum()).pow(2).sum(-1)
        self.log("val/explained_variance", 1 - (err * w).sum() / (var * w).sum())
        self.log("val/mse", (err * w).sum() / w.sum() / h.shape[-1])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_gradient()  # after DDP's all-reduce: every rank edits the same gradient

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr, eps=6.25e-10)

    @torch.no_grad()
    def build_banks(self, loader: Any, professions: list[str], seed: int = 0) -> dict[str, DirectionBank]:
        """SAE, dense (no SAE) and random-latent banks from a corpus loader (Eq. 3)."""
        hp, codes, raw, gender, prof, token_sum, token_count = self.hparams, [], [], [], [], 0.0, 0.0
        for batch in loader:
            h = layer_features(self.encoder, batch["input_ids"], batch["attention_mask"], hp.layer)
            z = self.sae.encode(h) if hp.code == "topk" else self.sae.encode_dense(h)
            codes.append(pool_tokens(z, batch["attention_mask"], hp.pooling))
            raw.append(pool_tokens(h, batch["attention_mask"], hp.pooling))
            mask = batch["attention_mask"][..., None].float()
            token_sum, token_count = token_sum + (h * mask).sum((0, 1)), token_count + mask.sum()
            gender.append(batch["gender"])
            prof.append(batch["profession"])
        gender, prof = torch.cat(gender), torch.cat(prof)
        origin = {"mean": token_sum / token_count, "zero": torch.zeros_like(self.sae.b_dec),
                  "b_dec": self.sae.b_dec.detach().clone()}[hp.origin]
        delta = keep_top_latents(class_mean_difference(torch.cat(codes), gender, prof, len(professions)), hp.latents)
        basis = self.sae.W_dec if hp.direction_source == "decoder" else self.sae.W_enc.T
        fallback = hp.fallback == "global"
        dense_delta = class_mean_difference(torch.cat(raw), gender, prof, len(professions))
        sae_bank = bank_from_deltas(delta, basis, professions, origin, fallback)
        self.banks = {
            "sae": sae_bank,
            "dense": bank_from_deltas(dense_delta, None, professions, origin, fallback),
            "sae_random": random_latent_bank(basis.detach(), professions, origin, hp.random_latents,
                                             sum(sae_bank.scales.values()) / len(professions),
                                             torch.Generator().manual_seed(seed)),
        }
        return self.banks

    def hook(self, bank: DirectionBank, strength: float, mode: str = "project") -> DebiasHook:
        """The inference-time hook on this module's encoder (the probe's and the pipeline's edit)."""
        return DebiasHook([EncoderSite(self.encoder, self.tokenizer, self.hparams.layer)], bank, strength, mode)

    def probe_bias(self, probe: GenderProbe, prompts: dict[str, list[str]], bank: DirectionBank | None,
                   strength: float) -> dict[str, float]:
        """Embedding-space P(male) per profession of its neutral prompts, with ``bank``'s edit (None: none)."""
        out = {}
        for profession, texts in prompts.items():
            if bank is None or strength == 0:
                feats = conditioning(self.encoder, self.tokenizer, texts)
            else:
                with self.hook(bank, strength, self.hparams.mode)(texts, [profession] * len(texts)):
                    feats = conditioning(self.encoder, self.tokenizer, texts)
            out[profession] = float(probe.p_male(feats).mean())
        return out

    def evaluate_images(self, banks: dict[str, DirectionBank], splits: dict[str, list[str]]) -> dict[str, float]:
        """CLIP bias and CLIP score of the pipeline's images, with and without the SAE and dense banks."""
        from core.clip_judge import ClipJudge
        from lit_modules.sae_debias_eval import evaluate_pipeline, load_pipeline, pipeline_bank

        hp = self.hparams
        device = self.trainer.strategy.root_device
        judge = ClipJudge(hp.clip_model, device=device)  # first: a missing judge fails before the long load
        pipe = load_pipeline(hp.pipeline).to(device)
        layers = list(hp.pipeline_layers or [hp.layer])
        rows = {row: pipeline_bank(banks[row], pipe, layers, list(hp.pipeline_banks or []), row)
                for row in ("sae", "dense")}
        return evaluate_pipeline(pipe, judge, rows, splits, layers, hp.eval_images, hp.eval_steps, hp.guidance,
                                 hp.strength, hp.mode)

    def on_fit_end(self) -> None:
        dm = self.trainer.datamodule
        self.cpu()
        banks = self.build_banks(dm.corpus_dataloader(), dm.professions, seed=dm.hparams.seed)
        run_dir = run_directory(self.trainer)
        self.sae.save(run_dir / "sae")
        for name, bank in banks.items():
            bank.save(run_dir / "banks" / f"{name}.safetensors")
        texts, male = dm.probe_set()
        probe = GenderProbe(conditioning(self.encoder, self.tokenizer, texts), male)
        rows = {row: self.probe_bias(probe, dm.neutral_set(), banks.get(row), self.hparams.strength)
                for row in ("none", "sae", "dense")}
        metrics = {}
        for split, names in (("train", dm.professions), ("heldout", dm.heldout)):
            for row, p_male in rows.items():
                metrics[f"test/probe_bias_{split}_{row}"] = sum(bias_of(p_male[p]) for p in names) / len(names)
        if self.hparams.pipeline:
            metrics.update(self.evaluate_images(banks, {"train": dm.professions, "heldout": dm.heldout}))
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics)
        from lit_modules.sae_debias_plots import plot_probe

        plot_probe(rows, dm.professions, dm.heldout, run_dir / "probe_bias.png", self.trainer.loggers)
