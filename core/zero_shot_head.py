"""Zero-shot classification heads from class names and a CLIP text encoder.

CLIP classifies an image by the cosine similarity of its embedding to the text embeddings of
prompts such as "a photo of a {class}.". Model-merging work (task arithmetic, AdaMerging,
Representation Surgery) keeps these text heads frozen and merges only the image towers. The head
of one task is built as in CLIP's zero-shot evaluation:

    e_c = normalise( mean_t normalise( text(template_t(c)) ) ),   W = exp(logit_scale) * [e_1; ...; e_C]

and applied to the L2-normalised image embedding: ``logits = W z / |z|``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Generic photo prompts (CLIP's zero-shot recipe averages several phrasings of one class name);
# a task's own prompts, e.g. "a photo of the number {}." for digits, go in through ``templates``.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
)


@torch.no_grad()
def zero_shot_head(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    logit_scale: float = 100.0,
) -> Tensor:
    """Head matrix ``(num_classes, dim)`` whose rows are the scaled, normalised mean prompt embeddings.

    Args:
        encode_text: maps a list of prompts to their (projected) text embeddings ``(len, dim)``.
        class_names: one readable name per class, in label order.
        templates: prompt patterns with one ``{}`` where the class name goes.
        logit_scale: the softmax temperature folded into the head (CLIP's exp(logit_scale) = 100).

    Returns:
        A float32 tensor; every row has norm ``logit_scale``.
    """
    if not class_names:
        raise ValueError("zero-shot head: no class names (the data module's class_names for this task is empty)")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"model.init_args.templates: every template needs exactly one '{{}}'; got {list(templates)}")
    rows = []
    for name in class_names:
        prompts = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(prompts.mean(0), dim=-1))
    return logit_scale * torch.stack(rows)


def clip_text_encoder(path: str, device: torch.device | str = "cpu") -> Callable[[list[str]], Tensor]:
    """Load a Hugging Face CLIP text tower with its projection and tokenizer: ``prompts -> embeddings``.

    Args:
        path: a local directory or a hub id of a CLIP checkpoint (e.g. ``openai/clip-vit-base-patch32``,
            the text side of timm's ``vit_base_patch32_clip_224.openai``); read from the local cache
            when ``HF_HUB_OFFLINE=1``. No remote code is run.
        device: where the text tower runs.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(path)
        model = CLIPTextModelWithProjection.from_pretrained(path).to(device).eval()
    except OSError as error:
        hint = " (a local directory)" if Path(path).exists() else " (not a local path; is it in the Hugging Face cache?)"
        raise FileNotFoundError(f"model.init_args.text_encoder: cannot load a CLIP text tower from {path!r}{hint}: "
                                f"{error}") from error

    @torch.no_grad()
    def encode(prompts: list[str]) -> Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        return model(**tokens).text_embeds

    return encode
