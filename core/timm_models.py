"""Build timm models from a name plus optional local weights, with errors that name the config key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def load_state_dict(path: str | Path, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, a plain ``torch.save`` file or a Lightning checkpoint.

    Lightning checkpoints (``state_dict`` with a ``model.`` prefix) and official DeiT files (weights
    under ``model``) are unwrapped. Pickled objects are refused (``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no file at {path}; set {key} to an existing checkpoint")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if any(k.startswith("model.") for k in obj):
        obj = {k.removeprefix("model."): v for k, v in obj.items() if k.startswith("model.")}
    return obj


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    kwargs: dict[str, Any] | None = None,
    key: str = "model",
    checkpoint_key: str | None = None,
) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with local weights and clear errors.

    Args:
        name: a timm model name (``deit_tiny_patch16_224``, ``vit_small_patch16_224``, ``resnet50``...).
        pretrained: load timm's pretrained weights (needs them in the local Hugging Face cache when
            offline).
        checkpoint: path of weights to load strictly after creation (safetensors, ``.pth``, ``.ckpt``).
        kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``num_classes``...).
        key: the config key prefix used in error messages (e.g. ``model.init_args.teacher``).
        checkpoint_key: the config key of ``checkpoint`` in error messages (default ``<key>_checkpoint``,
            e.g. ``model.init_args.teacher_checkpoint``).
    """
    checkpoint_key = checkpoint_key or f"{key}_checkpoint"
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(f"{key}: unknown timm model {name!r}; see timm.list_models() for valid names")
    try:
        model = timm.create_model(name, pretrained=pretrained, **(kwargs or {}))
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"{key}: could not load pretrained weights for {name!r} ({err}). Offline, put the weights in "
            f"the Hugging Face cache or pass a local file as the checkpoint and pretrained: false."
        ) from err
    if checkpoint is not None:
        state = load_state_dict(checkpoint, key=checkpoint_key)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint_key} {checkpoint} does not match {name} with {kwargs or {}}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def export_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights as safetensors, atomically (a half-written file never appears)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path
