"""Image-level evaluation of SAE Debias on a Stable Diffusion pipeline from local weights (method notes s. 2).

For every profession, ``images`` samples of "a photo of a {p}" (image i seeded i, the same noise for every
row) are drawn without intervention and through each direction bank's hook; a CLIP judge
(:class:`core.clip_judge.ClipJudge`) reads P(male) per image (zero-shot "a photo of a man / woman") and
the CLIP score against the prompt. Per split (training / held-out professions) and row:

    clip_bias  = mean_p 2 |mean_i P(male | x_pi) - 1/2|      (0: balanced, 1: one gender)
    clip_score = mean_{p, i} CLIPScore(x_pi, prompt_p)        (faithfulness; should barely move)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.bias_directions import DirectionBank, concat_banks
from core.clip_judge import ClipJudge
from core.debias_hook import DebiasHook, pipeline_sites
from core.packaged_models import resolve_model


def load_pipeline(name: str, key: str = "model.init_args.pipeline") -> Any:
    """A diffusers text-to-image pipeline from a local folder / cached hub id (no safety checker: it blanks images)."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{key}={name!r}: no local pipeline ({err.__class__.__name__}); download it once "
                                "with network access, or point the key at a local diffusers folder") from err
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_bank(own: DirectionBank, pipe: Any, layers: list[int], banks: list[str], row: str) -> DirectionBank:
    """The ``row`` bank over all of ``pipe``'s text encoders: ``banks[i]`` is ``""`` (this run's own bank),
    ``none`` (encoder i unedited) or the ``banks/`` folder of the run whose SAE read encoder i (its
    ``<row>.safetensors`` is used); no entries: this run's bank on the first encoder only."""
    sites = pipeline_sites(pipe, layers)
    banks = banks or [""] + ["none"] * (len(sites) - 1)
    if len(banks) != len(sites):
        raise ValueError(f"model.init_args.pipeline_banks={banks}: the pipeline has {len(sites)} text encoder(s)")
    parts = [own if b == "" else site.width if b == "none" else DirectionBank.load(Path(b) / f"{row}.safetensors")
             for b, site in zip(banks, sites)]
    return concat_banks(parts)


@torch.no_grad()
def evaluate_pipeline(pipe: Any, judge: ClipJudge, banks: dict[str, DirectionBank], splits: dict[str, list[str]],
                      layers: list[int], images: int = 8, steps: int = 50, guidance: float = 7.5,
                      strength: float = 1.0, mode: str = "project", seed: int = 0) -> dict[str, float]:
    """``test/clip_bias_{split}_{row}`` and ``test/clip_score_{split}_{row}`` for ``none`` and every bank."""
    sites = pipeline_sites(pipe, layers)
    device = pipe.device
    rows: dict[str, DebiasHook | None] = {"none": None}
    rows.update({name: DebiasHook(sites, bank, strength, mode) for name, bank in banks.items()})
    metrics = {}
    for split, professions in splits.items():
        for row, hook in rows.items():
            bias, score = [], []
            for profession in professions:
                prompts = [f"a photo of a {profession}"] * images
                generators = [torch.Generator(device).manual_seed(seed + i) for i in range(images)]
                kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt")
                if hook is None:
                    pictures = pipe(prompts, **kwargs).images
                else:
                    with hook(prompts, [profession] * images):
                        pictures = pipe(prompts, **kwargs).images
                pictures = pictures.float().cpu()
                bias.append(2 * (judge.p_male(pictures).mean() - 0.5).abs())
                score.append(judge.clip_score(pictures, prompts).mean())
            metrics[f"test/clip_bias_{split}_{row}"] = float(torch.stack(bias).mean())
            metrics[f"test/clip_score_{split}_{row}"] = float(torch.stack(score).mean())
    return metrics
