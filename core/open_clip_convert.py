"""Convert the public task_vectors / AdaMerging checkpoints (open_clip image towers) to what the configs read.

The task_vectors release (Ilharco et al.), which AdaMerging and the Surgery papers reuse, ships
``zeroshot.pt`` and ``<Task>/finetuned.pt`` as pickled open_clip ``ImageEncoder`` objects and heads as
pickled ``ClassificationHead`` objects. litzoo never unpickles files (``weights_only=True``), so a user
first turns each pickle into a plain state dict once, in an environment they trust (see
docs/methods/surgery.md), then this converter maps the open_clip names to timm's
``vit_*_clip_224`` (``visual.conv1`` -> ``patch_embed.proj``, ``transformer.resblocks`` -> ``blocks``,
``proj`` -> ``head.weight``^T, ...; timm's own ``_convert_openai_clip``) and writes safetensors:
``<out>/<Task>.safetensors`` and ``<out>/<Task>.head.safetensors`` (``weight``: classes x dim, logit
scale included, as ``ClassificationHead`` stores it).

    python -m core.open_clip_convert --model vit_base_patch32_clip_224 --tower zeroshot_sd.pt \\
        --out /data/surgery/ViT-B-32/zeroshot.safetensors
    python -m core.open_clip_convert --model vit_base_patch32_clip_224 --tower SUN397_sd.pt \\
        --head head_SUN397_sd.pt --out /data/surgery/ViT-B-32/SUN397.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import _convert_openai_clip
from torch import Tensor

# where the visual tower sits in the state dicts people have: ImageEncoder, a whole CLIP model, the tower
PREFIXES = ("model.visual.", "visual.", "")


def convert_tower(state: dict[str, Tensor], model: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """An open_clip visual state dict as the timm model's state dict (checked: strict load, same shapes)."""
    prefix = next((p for p in PREFIXES if any(k.startswith(p + "conv1.") for k in state)), None)
    if prefix is None:
        raise ValueError("not an open_clip image tower: no '[model.][visual.]conv1.weight' key (keys: "
                         f"{sorted(state)[:5]}...)")
    if prefix == "":  # timm's converter strips a prefix: give it one
        state, prefix = {f"visual.{k}": v for k, v in state.items()}, "visual."
    target = timm.create_model(model, pretrained=False, **(model_kwargs or {}))
    converted = _convert_openai_clip(state, target, prefix=prefix)
    missing = sorted(set(target.state_dict()) - set(converted))
    if missing:
        raise ValueError(f"--model {model}: the open_clip tower lacks {missing[:5]}; pick the matching timm CLIP model")
    target.load_state_dict(converted, strict=True)  # raises on any shape mismatch
    return {k: v.contiguous() for k, v in target.state_dict().items()}


def convert_head(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``ClassificationHead`` state dict (``weight``, zero ``bias``) as ``{"weight"}`` for ``TaskHeads``."""
    if "weight" not in state:
        raise ValueError(f"not a classification head: no 'weight' key (keys: {sorted(state)})")
    if "bias" in state and state["bias"].abs().max() > 0:
        raise ValueError("the head has a non-zero bias, which litzoo's zero-shot heads do not model")
    return {"weight": state["weight"].float().contiguous()}


def _load(path: str) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="timm CLIP image tower, e.g. vit_base_patch32_clip_224")
    parser.add_argument("--tower", required=True, help="state dict (torch.save) of the open_clip image encoder")
    parser.add_argument("--head", default=None, help="state dict of its ClassificationHead (optional)")
    parser.add_argument("--out", required=True, type=Path, help="<name>.safetensors; the head goes to <name>.head.safetensors")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(convert_tower(_load(args.tower), args.model), str(args.out))
    if args.head:
        save_file(convert_head(_load(args.head)), str(args.out.with_name(args.out.name.removesuffix(".safetensors")
                                                                          + ".head.safetensors")))


if __name__ == "__main__":
    main()
