"""Suppress per-profession gender directions in a diffusers pipeline's text encoder(s) at inference.

For every token t of a *conditional* prompt's residual H at the hooked layer (method notes s. 1.5):

    project  (default)  H_t <- H_t - lambda <H_t - c, u_p> u_p                                    (S1)
    subtract            H_t <- H_t - lambda s v_p,  s = sign <mean_t H_t - c, u_p>,  v_p = ||v_p|| u_p  (S2)

Which rows of a text-encoder call are conditional is decided by their token ids (the prompts are
tokenised exactly as the pipeline does), not by a call counter: it works with and without classifier-free
guidance, with SDXL's zeroed negative prompt (no unconditional encoder call) and with batched prompts.
``also_negate_uncond`` applies the opposite edit to the remaining (unconditional / negative) rows, as
Concept Steerers does. Prompts that already name a gender (``keep_words``: "a photo of a female
doctor") are left as asked: debiasing targets the unspecified case, and explicit requests must survive. SDXL: the bank's direction spans the concatenation of both encoders' widths;
each encoder gets its slice, renormalised (the joint projection cannot be computed one encoder at a time).
lambda = 0 returns the layer output untouched, so images are bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from core.bias_directions import DirectionBank, unit
from core.text_layers import hidden_of, layer_module, with_hidden

GENDERED_WORDS = ("male", "female", "man", "woman", "men", "women", "boy", "girl", "gentleman", "lady", "guy",
                  "he", "she", "his", "her", "him", "father", "mother", "brother", "sister", "uncle", "aunt", "son",
                  "daughter", "husband", "wife")


@dataclass
class EncoderSite:
    """One text encoder of a pipeline, its tokenizer and the layer edited in it."""

    encoder: nn.Module
    tokenizer: Any
    layer: int

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)


def pipeline_sites(pipe: Any, layers: int | Sequence[int]) -> list[EncoderSite]:
    """The pipeline's text encoders in conditioning order (SD: one; SDXL: CLIP-L then OpenCLIP-bigG)."""
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    pairs = [(e, t) for e, t in pairs if e is not None]
    layers = [layers] * len(pairs) if isinstance(layers, int) else list(layers)
    if len(layers) != len(pairs):
        raise ValueError(f"layers={layers}: the pipeline has {len(pairs)} text encoder(s), give one layer each")
    return [EncoderSite(e, t, layer) for (e, t), layer in zip(pairs, layers)]


def edit_hidden(hidden: Tensor, u: Tensor, weight: Tensor, scale: Tensor, origin: Tensor, strength: float,
                mode: str) -> Tensor:
    """Eq. (S1)/(S2) on (B, T, d) ``hidden``; ``u`` (B, d) unit rows; ``weight`` (B,) or per token (B, T):
    +1 edit, -1 the opposite edit, 0 untouched."""
    w = (weight if weight.dim() == 2 else weight[:, None])[..., None]  # (B, T or 1, 1)
    if mode == "project":
        coeff = ((hidden - origin) * u[:, None]).sum(-1, keepdim=True)  # (B, T, 1)
        return hidden - strength * w * coeff * u[:, None]
    if mode == "subtract":
        sign = torch.sign(((hidden.mean(1) - origin) * u).sum(-1))  # (B,)
        return hidden - strength * w * (sign * scale)[:, None, None] * u[:, None]
    raise ValueError(f"mode={mode!r}: use project or subtract")


class DebiasHook:
    """Context manager factory: ``with hook(prompts): pipe(prompts, ...)`` edits the conditional branch.

    Args:
        sites: the pipeline's text encoders (:func:`pipeline_sites`).
        bank: per-profession directions with the width of the sites together.
        strength: lambda (0 leaves everything bit-exact).
        mode: ``project`` (Eq. S1) or ``subtract`` (Eq. S2, Concept Steerers-style).
        also_negate_uncond: also apply the opposite edit to non-conditional rows (Concept Steerers).
        keep_words: prompts containing any of these words are not edited (``()`` edits every prompt).
        positions: ``all`` token positions (Concept Steerers; for CLIP the padding after EOS carries the
            prompt too) or ``content`` (skip the tokenizer's special and padding tokens: BERT's [CLS]/[SEP]
            carry outlier norms and no profession).
    """

    def __init__(self, sites: list[EncoderSite], bank: DirectionBank, strength: float = 1.0, mode: str = "project",
                 also_negate_uncond: bool = False, keep_words: Sequence[str] = GENDERED_WORDS,
                 positions: str = "all") -> None:
        if positions not in ("all", "content"):
            raise ValueError(f"positions={positions!r}: use all or content")
        self.positions = positions
        if mode not in ("project", "subtract"):
            raise ValueError(f"mode={mode!r}: use project or subtract")
        width = sum(site.width for site in sites)
        if width != bank.dim:
            raise ValueError(f"direction bank has dimension {bank.dim} but the text encoder(s) are {width} wide: "
                             "build the bank with an SAE trained on the same text encoder (model.init_args.text_encoder)")
        for site in sites:
            layer_module(site.encoder, site.layer, key="layer")
        self.sites, self.bank, self.strength, self.mode = sites, bank, strength, mode
        self.also_negate_uncond = also_negate_uncond
        self._keep = re.compile(r"\b(" + "|".join(map(re.escape, keep_words)) + r")\b", re.IGNORECASE) \
            if keep_words else None

    @contextmanager
    def __call__(self, prompts: str | Sequence[str], professions: Sequence[str | None] | None = None) -> Iterator[None]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        professions = list(professions) if professions is not None else [None] * len(prompts)
        found = [self.bank.direction(p, prompt) for p, prompt in zip(professions, prompts)]
        edit = torch.tensor([self._keep is None or not self._keep.search(prompt) for prompt in prompts])
        directions = torch.stack([d for d, _ in found]) * edit[:, None]  # (P, d_total); zero rows: left as asked
        scales = torch.tensor([s for _, s in found])
        handles, start = [], 0
        try:
            for site in self.sites:
                piece = slice(start, start + site.width)
                start += site.width
                handles += self._attach(site, prompts, unit(directions[:, piece]), scales, self.bank.origin[piece])
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _attach(self, site: EncoderSite, prompts: list[str], u: Tensor, scales: Tensor, origin: Tensor) -> list:
        max_length = site.tokenizer.model_max_length
        cond_ids = site.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").input_ids  # the pipeline's own tokenisation
        special = torch.tensor(sorted(set(site.tokenizer.all_special_ids)))
        rows: dict[str, Tensor] = {}

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            match = (ids[:, None, :] == cond_ids.to(ids.device)[None]).all(-1).to(u.dtype)  # (B, P)
            is_cond = match.sum(-1).clamp_max(1.0)
            negated = -(1.0 - is_cond) if self.also_negate_uncond else torch.zeros_like(is_cond)
            # Non-conditional rows borrow the first prompt's direction for the opposite edit.
            pick = match + (1.0 - is_cond)[:, None] * torch.nn.functional.one_hot(
                torch.zeros_like(is_cond, dtype=torch.long), len(prompts)).to(u.dtype)
            weight = (is_cond + negated)[:, None]
            if self.positions == "content":
                weight = weight * ~torch.isin(ids, special.to(ids.device))
            rows.update(u=pick @ u.to(ids.device), scale=pick @ scales.to(u.dtype).to(ids.device), weight=weight)

        def after(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
            if self.strength == 0 or not rows:
                return output
            hidden = hidden_of(output)
            edited = edit_hidden(hidden, rows["u"].to(hidden.dtype), rows["weight"].to(hidden.dtype),
                                 rows["scale"].to(hidden.dtype), origin.to(hidden), self.strength, self.mode)
            return with_hidden(output, edited)

        return [site.encoder.register_forward_pre_hook(before, with_kwargs=True),
                # prepend: run before transformers' own output-recording hooks, so that hidden_states[L + 1]
                # (SDXL's penultimate-layer conditioning) holds the edited state, not the original.
                layer_module(site.encoder, site.layer, key="layer").register_forward_hook(after, prepend=True)]
