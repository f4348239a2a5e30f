"""FSDP that shards each transformer block as its own unit, named in YAML by class name.

Lightning's ``FSDPStrategy`` without an ``auto_wrap_policy`` makes the whole model one FSDP unit, so every
rank gathers all parameters at once and nothing is saved. Block classes cannot be written in YAML as
classes, so this strategy takes their names and wraps every module whose class has one of them (the LLM's
decoder layers, the ViT's blocks, open_clip's residual blocks, diffusers' transformer blocks). With
``sync_module_states`` (on) rank 0's weights are broadcast when the model is wrapped, so a module may load
full pretrained weights on rank 0 only and build the others on the ``meta`` device
(:func:`core.fsdp_init.loads_full_weights`): one copy of the full model in host memory instead of one per rank.

    strategy:
      class_path: cli.fsdp.BlockFSDPStrategy
      init_args: {blocks: [LlamaDecoderLayer], sharding_strategy: FULL_SHARD}
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

DEFAULT_BLOCKS = (
    "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GPT2Block",  # Hugging Face LLMs
    "Block",  # timm ViT / DeiT
    "ResidualAttentionBlock", "CLIPEncoderLayer",  # open_clip, Hugging Face CLIP
    "BasicTransformerBlock",  # diffusers UNet / DiT
)


def wraps_block(module: nn.Module, names: frozenset[str]) -> bool:
    """Whether ``module`` is one FSDP unit: its class name is one of ``names``."""
    return type(module).__name__ in names


def block_wrap_policy(names: tuple[str, ...] | list[str]) -> Any:
    """An FSDP ``auto_wrap_policy`` wrapping every module whose class name is in ``names``."""
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=functools.partial(wraps_block, names=frozenset(names)))


def _materialize(module: nn.Module) -> None:
    """``param_init_fn`` for modules built on the meta device: allocate them (rank 0's values arrive by broadcast)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to_empty(device=device, recurse=False)


class BlockFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` with one FSDP unit per transformer block, and rank 0's weights broadcast at wrap time.

    Args:
        blocks: class names of the modules that become FSDP units.
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``NO_SHARD`` or ``HYBRID_SHARD``.
        state_dict_type: ``full`` (one consolidated checkpoint) or ``sharded`` (one file per rank).
        activation_checkpointing: recompute the activations of every wrapped block in the backward pass.
        sync_module_states: broadcast rank 0's parameters and buffers when wrapping (needed when the other
            ranks build the model on the meta device).
        cpu_offload: keep sharded parameters on the CPU between uses.
        **kwargs: further ``FSDPStrategy`` / FSDP arguments.
    """

    def __init__(self, blocks: list[str] | None = None, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "full", activation_checkpointing: bool = False,
                 sync_module_states: bool = True, cpu_offload: bool = False, **kwargs: Any) -> None:
        self.blocks = list(blocks or DEFAULT_BLOCKS)
        policy = block_wrap_policy(self.blocks)
        super().__init__(auto_wrap_policy=policy, activation_checkpointing_policy=policy if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, cpu_offload=cpu_offload,
                         sync_module_states=sync_module_states, param_init_fn=_materialize if sync_module_states else None,
                         **kwargs)
