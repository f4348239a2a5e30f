"""CLIP evaluation of generated images for the Stable Diffusion settings of SAE Debias (method notes s. 2).

- gender: zero-shot over the two prompts "a photo of a man" / "a photo of a woman",
  P(male | x) = softmax_c( exp(logit_scale) * cos(f(x), g(t_c)) )_man                         (E1)
- CLIP score: 100 * max(cos(f(x), g(prompt)), 0) (Hessel et al. 2021, w = 1 as in torchmetrics)   (E2)

The model comes from a local folder (transformers' ``CLIPModel`` + ``CLIPProcessor``: ViT-L/14 in the
paper's protocol); a missing one is an error naming the config key. Images are (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.packaged_models import resolve_model

GENDER_PROMPTS = ("a photo of a man", "a photo of a woman")


class ClipJudge:
    """A frozen CLIP model that reads gender and prompt agreement from images.

    Args:
        model: local folder, alias or cached hub id of a transformers CLIP model with its processor.
        key: the config key that named it (for the error when it is missing).
        gender_prompts: (male, female) zero-shot prompts.
        batch_size: images per forward.
        device: where the model runs (results come back on the CPU).
    """

    def __init__(self, model: str, key: str = "model.init_args.clip_model",
                 gender_prompts: Sequence[str] = GENDER_PROMPTS, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not model:
            raise ValueError(f"{key} is empty: the image evaluation needs a local CLIP model folder "
                             "(e.g. openai/clip-vit-large-patch14 downloaded once)")
        try:
            self.model = CLIPModel.from_pretrained(resolve_model(model)).eval().requires_grad_(False)
            self.processor = CLIPProcessor.from_pretrained(resolve_model(model))
        except OSError as err:
            raise FileNotFoundError(f"{key}={model!r}: no local CLIP weights ({err.__class__.__name__}); download "
                                    "the model once with network access, or point the key at a local folder") from err
        self.batch_size, self.device = batch_size, torch.device(device)
        self.model.to(self.device)
        self.gender_text = self.text_embeds(list(gender_prompts))

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> Tensor:
        """(N, e) unit text embeddings."""
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1).cpu()

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """(N, e) unit image embeddings of (N, 3, H, W) images in [0, 1] (the processor resizes and normalises)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(images=list(images[start:start + self.batch_size].float()),
                                                    do_rescale=False, return_tensors="pt").pixel_values.to(self.device)
            feats = self.model.get_image_features(pixel_values=pixels)
            out.append(torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1).cpu())
        return torch.cat(out)

    def p_male(self, images: Tensor) -> Tensor:
        """(N,) zero-shot P(male) per image (Eq. E1)."""
        logits = self.model.logit_scale.exp().cpu() * self.image_embeds(images) @ self.gender_text.T
        return logits.softmax(-1)[:, 0]

    def clip_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) CLIP score of each image against its prompt (Eq. E2)."""
        cos = (self.image_embeds(images) * self.text_embeds(list(prompts))).sum(-1)
        return 100 * cos.clamp_min(0)
